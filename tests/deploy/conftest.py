"""Shared helpers of the deploy tests: close checks, all-at-once batches, long prompts, first-token
alternatives, streaming bursts."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from tandemlm.deploy.engine import Engine


def check_close_fails_running_and_queued(engine: Engine, ids: list[int], params: object) -> None:
    """close() answers a running and a queued caller with an EngineError (none left blocked), refuses
    new work afterwards, and may be called twice. ``params`` must make generation run long."""
    from tandemlm.errors import EngineError

    started, submitted = threading.Event(), threading.Event()
    errors: dict[str, BaseException | None] = {}

    def running() -> None:
        try:
            for _ in engine.stream_tokens(ids, params):  # type: ignore[attr-defined]
                started.set()
            errors["running"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["running"] = exc

    def queued() -> None:
        try:
            stream = engine.stream_tokens(ids, params)  # type: ignore[attr-defined]  # submitted while the first decodes
            submitted.set()
            list(stream)
            errors["queued"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["queued"] = exc

    threads = [threading.Thread(target=running, daemon=True), threading.Thread(target=queued, daemon=True)]
    threads[0].start()
    assert started.wait(60)
    threads[1].start()
    assert submitted.wait(10)
    engine.close()
    for thread in threads:
        thread.join(timeout=10)  # a liveness check: a caller left blocked would hang here
    assert not any(thread.is_alive() for thread in threads), "a caller was left blocked after close()"
    for name in ("running", "queued"):
        assert isinstance(errors[name], EngineError) and "closed" in str(errors[name]), (name, errors[name])
    with pytest.raises(EngineError, match="closed"):
        engine.stream_tokens(ids, params)  # type: ignore[attr-defined]
    engine.close()  # a second close is harmless


@pytest.fixture(scope="session")
def close_check():
    """:func:`check_close_fails_running_and_queued`, for the engine test modules."""
    return check_close_fails_running_and_queued


def check_the_end_token_is_kept(engine: Engine, prompt_ids: list[int]) -> None:
    """A generation that stops on the end-of-sequence token reports it last (as vLLM does): marked
    ``end``, without text, with the log-probability the engine's scoring gives it (usage counts the
    answer's tokens: not it).
    Logit bias makes it the first token, whatever the weights (reported log-probabilities ignore it)."""
    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.types import SamplingParams

    (eos,) = engine.tokenize(engine.special_tokens()["eos_token"])
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0, logit_bias={eos: 100.0})
    (token,) = list(engine.stream_tokens(prompt_ids, params))  # type: ignore[attr-defined]
    assert (token.token_id, token.text, token.end) == (eos, "", True)
    assert token.logprob == pytest.approx(engine.score_tokens(prompt_ids, [eos])[0], abs=1e-4)  # type: ignore[attr-defined]
    result = collect(engine.generate(prompt_ids, params))
    assert (result.text, result.finish_reason, result.usage.completion_tokens) == ("", "stop", 0)
    assert [(lp.token, lp.token_bytes) for lp in result.logprobs] == [("", b"")]
    assert result.logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)


@pytest.fixture(scope="session")
def end_check():
    """:func:`check_the_end_token_is_kept`, for the engine test modules."""
    return check_the_end_token_is_kept


def generate_all_at_once(jobs: list[tuple[Engine, str]], params: object) -> list[str]:
    """Each ``(engine, prompt)`` generated from its own thread, all released together (so they batch)."""
    from tandemlm.deploy.engine import collect

    texts: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        texts[i] = collect(jobs[i][0].generate(jobs[i][1], params)).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [texts[i] for i in range(len(jobs))]


@pytest.fixture(scope="session")
def all_at_once():
    """:func:`generate_all_at_once`, for the adapter test modules."""
    return generate_all_at_once



def long_item_prompt(engine: Engine, tokens: int) -> list[dict[str, str]]:
    """One user message of exactly ``tokens`` tokens of numbered items (about two a word on SmolLM2), then a question."""
    ids = engine.tokenize(" ".join(f"item{i}" for i in range(tokens)))
    return [{"role": "user", "content": engine.detokenize(ids[:tokens]) + "\nHow many items?"}]


@pytest.fixture(scope="session")
def long_prompt():
    """:func:`long_item_prompt`, for the modules that need a long prefill."""
    return long_item_prompt


def first_token_alternatives(completion: object) -> dict[str, float]:
    """The first generated token's top alternatives (a completion with logprobs), token text -> log-prob."""
    first = completion.logprobs[0]  # type: ignore[attr-defined]
    return {alt.token: alt.logprob for alt in first.top}


@pytest.fixture(scope="session")
def first_token_top():
    """:func:`first_token_alternatives`, for the modules that compare a first token's distribution."""
    return first_token_alternatives


def check_sse_chat(lines: list[str]) -> str | None:
    """What is wrong with a whole streamed chat completion (None: well formed): every event JSON, the
    first naming the assistant role, exactly one finish reason, one id throughout, ``[DONE]`` last."""
    events = [line.removeprefix("data: ") for line in lines if line.strip()]
    if not events or events[-1] != "[DONE]":
        return f"does not end with [DONE]: {events[-1:]}"
    try:
        chunks = [json.loads(event) for event in events[:-1]]
    except json.JSONDecodeError as exc:
        return f"an event is not JSON: {exc}"
    if not chunks or chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        return "the first chunk does not name the assistant role"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if len(finishes) != 1 or len({c["id"] for c in chunks}) != 1:
        return f"finish reasons {finishes}, ids {len({c['id'] for c in chunks})}"
    return None


async def _streaming_burst(url: str, n: int, body: dict[str, object], leave_after_first: int) -> list[str]:
    async def one(client: httpx.AsyncClient, leave: bool) -> str:
        try:
            async with client.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as response:
                if response.status_code == 503:
                    error = json.loads(await response.aread())["error"]
                    assert error["code"] == "server_busy" and "busy" in error["message"]
                    return "503"
                assert response.status_code == 200, response.status_code
                lines: list[str] = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if leave and line.strip():
                        return "left"  # closes the connection mid-stream
                problem = check_sse_chat(lines)
                return "done" if problem is None else f"broken: {problem}"
        except httpx.HTTPError as exc:
            return f"broken: {exc!r}"

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, i < leave_after_first) for i in range(n))))


def streaming_burst(url: str, n: int, body: dict[str, object] | None = None, leave_after_first: int = 0) -> list[str]:
    """Fires ``n`` streaming chats at once; each ends as "done" (a whole, well-formed stream), "503",
    "left" (the first ``leave_after_first`` clients hang up after their first event) or "broken: …"."""
    body = body or {"messages": [{"role": "user", "content": "q"}]}
    return asyncio.run(_streaming_burst(url, n, body, leave_after_first))


@pytest.fixture(scope="session")
def burst():
    """:func:`streaming_burst`, for the server test modules."""
    return streaming_burst


@pytest.fixture(scope="module")
def live_smollm2(serve):
    """(base URL ending in /v1, model id) of a server for the built-in SmolLM2 on llama.cpp, one per module."""
    from tandemlm.deploy.registry import load_engine

    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=2)
    try:
        with serve(engine) as url:
            yield url, engine.info.model_id
    finally:
        engine.close()
