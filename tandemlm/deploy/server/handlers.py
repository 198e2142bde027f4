"""Chat and text completions: from a validated request to OpenAI bodies, streamed or whole.

Everything that can fail on the request's account (model name, sampling values, template, context
length, admission) is settled before the response starts; after that only our own failures remain
(reported as 500, or in-band once a stream has begun).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.choices import Choice, claim_slots, merged, release_all
from tandemlm.deploy.server.context import ServeContext, choice_params, sampling_params
from tandemlm.deploy.server.responses import ChatChunks, ChoiceResult, TextChunks, add_usage
from tandemlm.deploy.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, error_body
from tandemlm.deploy.server.service import Ticket
from tandemlm.deploy.tool_use import ChoiceTools, ToolPlan, plan_tools
from tandemlm.deploy.types import Delta, TokenLogprob, Usage

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class GenerationFailed(RuntimeError):
    """The engine failed after the request was accepted: our failure (a 500), not the client's."""


@dataclass
class Streamed:
    """A streamed answer: its SSE lines, and what frees its slots however it ends (started or not)."""

    lines: AsyncIterator[str]
    release: Callable[[], None]


@dataclass
class _Timing:
    """Per-choice latency bookkeeping for the metrics."""

    started: float = field(default_factory=time.perf_counter)
    first: dict[int, float] = field(default_factory=dict)

    def saw(self, index: int) -> None:
        self.first.setdefault(index, time.perf_counter())


@dataclass
class Prepared:
    """A request ready to run: its admission tickets and one engine stream per choice."""

    tickets: list[Ticket]
    choices: list[Choice]
    tools: dict[int, ChoiceTools] = field(default_factory=dict)
    echo: dict[int, tuple[str, list[TokenLogprob | None]]] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    # Echoed prompts to score once admitted (choice indexes sharing the prompt, the scoring work):
    # scoring is a forward pass, so it runs under the request's slots, not on the prepare thread.
    echo_jobs: list[tuple[list[int], Callable[[], tuple[str, list[TokenLogprob | None]]]]] = field(default_factory=list)

    async def admitted(self) -> None:
        for ticket in self.tickets:
            await ticket.admitted()
        results = await asyncio.gather(*(asyncio.to_thread(job) for _, job in self.echo_jobs))
        for (indexes, _), echoed in zip(self.echo_jobs, results, strict=True):
            self.echo.update(dict.fromkeys(indexes, echoed))

    def release(self) -> None:
        release_all(self.tickets)


async def _prepare(ctx: ServeContext, count: int, make: Callable[[], Prepared]) -> Prepared:
    tickets = claim_slots(ctx.admission, count)
    try:
        prepared = await ctx.prepare(make)
    except BaseException:
        release_all(tickets)
        raise
    prepared.tickets = tickets
    return prepared


# ---- chat -----------------------------------------------------------------------------------------
def _chat_plan(engine: Engine, body: ChatCompletionRequest) -> tuple[ToolPlan, list[dict[str, Any]]]:
    """The request's tool plan and the messages the template renders (tools prompt and forced call included)."""
    plan = plan_tools(engine.chat_template_source(), body.tool_dicts(), body.tool_choice_value(), body.parallel_tool_calls)
    if plan.constraint is not None and body.response_format is not None and body.response_format.type != "text":
        raise ValueError("response_format cannot be combined with a tool_choice that forces a call")
    return plan, plan.messages([m.as_message() for m in body.messages])


async def chat_prompt_tokens(ctx: ServeContext, body: ChatCompletionRequest) -> int:
    """How many prompt tokens :func:`chat_completion` would prefill for ``body`` (its usage's prompt_tokens)."""
    _, engine = ctx.resolve(body.model)
    plan, messages = _chat_plan(engine, body)
    constrained = plan.constraint is not None or (body.response_format is not None and body.response_format.type != "text")
    ids, _ = await ctx.prepare(lambda: engine.chat_prompt(messages, plan.template_tools, constrained=constrained))
    return len(ids)


async def chat_completion(ctx: ServeContext, body: ChatCompletionRequest) -> Any:
    name, engine = ctx.resolve(body.model)
    plan, messages = _chat_plan(engine, body)
    overrides = {"constraint": plan.constraint} if plan.constraint is not None else {}
    params = sampling_params(body, None, **overrides)

    def make() -> Prepared:
        choices = [Choice(i, engine.chat(messages, choice_params(params, i), plan.template_tools)) for i in range(body.n)]
        tools = {i: plan.choice() for i in range(body.n)} if plan.active else {}
        return Prepared([], choices, tools)

    prepared = await _prepare(ctx, body.n, make)
    chunks = ChatChunks(name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Streamed(_sse_envelope(prepared, _chat_stream(ctx, prepared, chunks, include_usage)), prepared.release)
    return await _gather(ctx, prepared, lambda results, usage: chunks.full(results, usage, body.logprobs))


async def _chat_stream(ctx: ServeContext, prepared: Prepared, chunks: ChatChunks, include_usage: bool) -> AsyncIterator[str]:
    usage, timing = Usage(), _Timing()
    for choice in prepared.choices:
        yield sse(chunks.role_chunk(choice.index))
    async for index, delta in merged(prepared.choices):
        timing.saw(index)
        tools = prepared.tools.get(index)
        content, tool_deltas = tools.feed(delta.text) if tools else (delta.text, [])
        finish = None
        if delta.finish_reason:
            rest, more = tools.flush() if tools else ("", [])
            content, tool_deltas = content + rest, tool_deltas + more
            finish = tools.finish_reason(delta.finish_reason) if tools else delta.finish_reason
            _record(ctx, timing, index, delta.usage, usage, count_prompt=index == 0)
        if content or delta.reasoning or tool_deltas or delta.logprobs or finish:
            yield sse(chunks.chunk(index, content, delta.reasoning, tool_deltas, delta.logprobs, finish))
    if include_usage:
        yield sse(chunks.usage_chunk(usage))


async def _sse_envelope(prepared: Prepared, lines: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """Waits for the request's slots, relays its SSE lines, reports a failure in-band, frees the
    slots however it ends, and closes with ``[DONE]``."""
    try:
        await prepared.admitted()  # a queued request waits here; its place is already claimed
        try:
            async for line in lines:
                yield line
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band and end cleanly
            yield sse(error_body(f"generation failed: {exc}", "server_error"))
    finally:
        await lines.aclose()  # a client gone mid-stream: stop the engine streams now, not at GC
        prepared.release()
    yield sse("[DONE]")


async def _gather(ctx: ServeContext, prepared: Prepared, build: Callable[[list[ChoiceResult], Usage], dict[str, Any]]) -> Any:
    """Runs every choice to its end and builds the whole body (a non-streamed response)."""
    results = {c.index: ChoiceResult(c.index) for c in prepared.choices}
    usage, timing = Usage(), _Timing()
    try:
        await prepared.admitted()
        async for index, delta in merged(prepared.choices):
            timing.saw(index)
            result = results[index]
            result.text += delta.text
            result.reasoning += delta.reasoning
            result.logprobs.extend(delta.logprobs)
            if delta.finish_reason:
                result.finish_reason = delta.finish_reason
                _record(ctx, timing, index, delta.usage, usage, count_prompt=index in prepared.prompt_tokens or index == 0)
    except Exception as exc:  # the request was validated before: a failure now is ours
        raise GenerationFailed(f"generation failed: {exc}") from exc
    finally:
        prepared.release()
    for index, tools in prepared.tools.items():
        result = results[index]
        content, _ = tools.feed(result.text)
        rest, _ = tools.flush()
        result.text = content + rest
        result.tool_calls, result.finish_reason = tools.calls, tools.finish_reason(result.finish_reason)
    for index, (text, echoed) in prepared.echo.items():
        results[index].text = text + results[index].text
        results[index].echo_logprobs = echoed
    return build([results[i] for i in sorted(results)], usage)


def _record(ctx: ServeContext, timing: _Timing, index: int, part: Usage | None, total: Usage, count_prompt: bool) -> None:
    add_usage(total, part, count_prompt)
    if part is not None:
        if count_prompt:
            ctx.metrics.prompt_tokens.inc(part.prompt_tokens)
        ctx.metrics.observe_choice(timing.started, timing.first.get(index), time.perf_counter(), part.completion_tokens)


# ---- text completions -----------------------------------------------------------------------------
async def text_completion(ctx: ServeContext, body: CompletionRequest) -> Any:
    name, engine = ctx.resolve(body.model)
    prompts = body.prompts()
    params = sampling_params(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    score_only = body.max_tokens == 0

    def make() -> Prepared:
        engine.check_params(params)  # also for echo-only requests, which generate nothing
        prepared = Prepared([], [])
        for p, prompt in enumerate(prompts):
            indexes = [p * body.n + j for j in range(body.n)]
            prepared.prompt_tokens[indexes[0]] = p
            for j, index in enumerate(indexes):
                stream = _scored(engine, prompt) if score_only else engine.generate(prompt, choice_params(params, j))
                prepared.choices.append(Choice(index, stream))
            if body.echo:
                prepared.echo_jobs.append((indexes, functools.partial(_echo, engine, prompt, body.logprobs)))
        return prepared

    # Every choice of every prompt is a generation of its own: each takes a slot, as chat's n does.
    prepared = await _prepare(ctx, len(prompts) * body.n, make)
    chunks = TextChunks(name)
    with_logprobs = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        lines = _text_stream(ctx, prepared, chunks, include_usage, with_logprobs)
        return Streamed(_sse_envelope(prepared, lines), prepared.release)
    return await _gather(ctx, prepared, lambda results, usage: chunks.full(results, usage, with_logprobs))


def _echo(engine: Engine, prompt: str | list[int], top: int | None) -> tuple[str, list[TokenLogprob | None]]:
    """The prompt's text and (when log-probabilities are asked for) each prompt token's log-probability."""
    ids = prompt if isinstance(prompt, list) else engine.tokenize(prompt, add_special_tokens=True)
    text = prompt if isinstance(prompt, str) else engine.detokenize(ids)
    if top is None:
        return text, []
    scored = engine.prompt_logprobs(ids[:1], ids[1:], top) if len(ids) > 1 else []
    return text, [None, *(engine.token_logprob(token) for token in scored)]


def _scored(engine: Engine, prompt: str | list[int]) -> Iterator[Delta]:
    """The stream of a ``max_tokens=0`` choice: nothing generated (the echo carries the answer)."""
    ids = prompt if isinstance(prompt, list) else engine.tokenize(prompt, add_special_tokens=True)
    yield Delta(finish_reason="length", usage=Usage(prompt_tokens=len(ids)))


async def _text_stream(
    ctx: ServeContext, prepared: Prepared, chunks: TextChunks, include_usage: bool, with_logprobs: bool
) -> AsyncIterator[str]:
    usage, timing = Usage(), _Timing()
    offsets: dict[int, int] = {}
    for index, (text, echoed) in prepared.echo.items():
        yield sse(chunks.text_chunk(index, text, echoed if with_logprobs else None, None, 0))  # type: ignore[arg-type]
        offsets[index] = len(text)
    async for index, delta in merged(prepared.choices):
        timing.saw(index)
        if delta.finish_reason:
            _record(ctx, timing, index, delta.usage, usage, count_prompt=index in prepared.prompt_tokens)
        start = offsets.get(index, 0)
        offsets[index] = start + len(delta.text)
        logprobs = delta.logprobs if with_logprobs else None
        yield sse(chunks.text_chunk(index, delta.text, logprobs, delta.finish_reason, start))
    if include_usage:
        yield sse(chunks.usage_chunk(usage))


# ---- embeddings -----------------------------------------------------------------------------------
async def embeddings(ctx: ServeContext, body: EmbeddingRequest) -> dict[str, Any]:
    """OpenAI embeddings: every input in one admission slot (a forward pass each, no generation)."""
    name, engine = ctx.resolve(body.model)
    inputs = body.inputs()

    def token_lists() -> list[list[int]]:
        return [engine.check_token_ids(i) if isinstance(i, list) else engine.tokenize(i, add_special_tokens=True) for i in inputs]

    ids = await ctx.prepare(token_lists)
    tickets = claim_slots(ctx.admission, 1)
    try:
        for ticket in tickets:
            await ticket.admitted()
        vectors = await asyncio.to_thread(engine.embed, ids)
    finally:
        release_all(tickets)
    tokens = sum(len(i) for i in ids)
    ctx.metrics.prompt_tokens.inc(tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    """A vector as floats, or as base64 of little-endian float32 (what the openai SDK decodes)."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
