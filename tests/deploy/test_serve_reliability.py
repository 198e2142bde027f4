"""The server under load and faults on a real engine: the built-in SmolLM2 on llama.cpp.

The mock-engine tests in test_server.py pin the HTTP contract; these check that the real scheduler
keeps it: slots come back after disconnects, a burst past the queue gets only whole streams and
503s, a client that leaves stops its work in the engine (queued, prefilling or decoding, streamed
or not), and memory does not grow with traffic.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import psutil
import pytest

from tandemlm.deploy.registry import load_engine

pytestmark = pytest.mark.slow

COUNT = [{"role": "user", "content": "Write the numbers from 1 to 300, separated by commas."}]
SHORT = {"messages": [{"role": "user", "content": "Name a colour. Answer in one short sentence."}], "max_tokens": 12}


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 on llama.cpp with 8 sequences (module-scoped: one real engine at a time)."""
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=4096, n_parallel=8)
    yield engine
    engine.close()


def _health(url: str) -> dict[str, object]:
    return httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()


def _wait_idle(url: str, seconds: float = 60) -> dict[str, object]:
    """Health once nothing runs or waits (returns the last answer if that never happens)."""
    deadline = time.monotonic() + seconds
    health = _health(url)
    while (health["running"] or health["queued"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        health = _health(url)
    return health


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def test_32_streams_with_a_quarter_leaving_complete_well_formed_and_leak_no_slot(smollm2, serve, burst):
    with serve(smollm2, max_concurrency=8, max_queue=32) as url:
        burst(url, 8, SHORT)  # warm-up: the first burst allocates what later ones reuse
        rss_before = _rss_mib()
        outcomes = burst(url, 32, SHORT, leave_after_first=8)
        assert outcomes.count("left") == 8
        assert outcomes.count("done") == 24, [o for o in outcomes if o not in ("done", "left")]
        assert _wait_idle(url) == {"status": "ok", "running": 0, "queued": 0}
        assert smollm2.max_sequences_per_step >= 2  # they really shared decode steps
        assert _rss_mib() <= rss_before * 1.10


def test_200_sequential_requests_do_not_grow_memory(smollm2, serve):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with serve(smollm2) as url, httpx.Client(timeout=60) as client:
        for _ in range(20):  # warm-up
            assert client.post(f"{url}/chat/completions", json=body).status_code == 200
        rss_before = _rss_mib()
        for _ in range(200):
            assert client.post(f"{url}/chat/completions", json=body).status_code == 200
        assert _rss_mib() <= rss_before * 1.10


def test_a_streaming_burst_past_the_queue_gets_only_whole_streams_and_503s_three_times(smollm2, serve, burst):
    body = {"messages": COUNT, "max_tokens": 12}
    with serve(smollm2, max_concurrency=2, max_queue=2) as url:
        for _ in range(3):
            outcomes = burst(url, 30, body)
            assert not [o for o in outcomes if o.startswith("broken")], outcomes
            assert outcomes.count("done") >= 4 and outcomes.count("503") >= 20, outcomes
            assert _wait_idle(url)["running"] == 0


def test_a_client_leaving_during_a_long_prefill_stops_it_and_frees_the_slot(smollm2, serve, long_prompt):
    messages = long_prompt(smollm2, 3500)  # 7 chunks of 512: seconds of prefill on 2 cores
    prompt_len = len(smollm2.tokenize(smollm2.render_chat(messages)))
    body = {"messages": messages, "max_tokens": 8, "stream": True}
    with serve(smollm2, max_concurrency=1, max_queue=0) as url:
        before = smollm2.prefilled_tokens
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            while smollm2.prefilled_tokens == before:  # leave once the prefill has begun
                time.sleep(0.005)
        assert _wait_idle(url) == {"status": "ok", "running": 0, "queued": 0}
        assert smollm2.prefilled_tokens - before < prompt_len  # it stopped between chunks
        # The one slot is free for the next client at once (no waiting room: a 503 if it were held).
        assert httpx.post(f"{url}/chat/completions", json=SHORT, timeout=60).status_code == 200


def test_an_abandoned_non_streaming_request_stops_in_the_engine(smollm2, serve):
    body = {"messages": COUNT, "max_tokens": 400, "temperature": 0}
    with serve(smollm2, max_concurrency=1, max_queue=0) as url:
        before = smollm2.sampled_tokens
        with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 400 tokens
            httpx.post(f"{url}/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
        assert _wait_idle(url) == {"status": "ok", "running": 0, "queued": 0}
        abandoned = smollm2.sampled_tokens - before
        answer = httpx.post(f"{url}/chat/completions", json=SHORT, timeout=60)
        assert answer.status_code == 200
        assert abandoned < 300, abandoned  # left alone it would have run all 400 (see the engine tests)


def test_a_20_mb_body_gets_413_while_health_answers_on_a_real_engine(smollm2, serve):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    with serve(smollm2) as url:
        base = url.removesuffix("/v1")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(
                httpx.post, f"{url}/chat/completions", content=huge, headers={"Content-Type": "application/json"}, timeout=60
            )
            while not future.done():
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200
                time.sleep(0.02)
        assert future.result().status_code == 413
        assert httpx.post(f"{url}/chat/completions", json=SHORT, timeout=60).status_code == 200
