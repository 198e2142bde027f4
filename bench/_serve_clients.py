"""Streaming load clients and their statistics for ``bench/serve_load.py`` (no server code here).

Per request, as an OpenAI client sees it: TTFT (request sent to first content chunk), TPOT (time per
output token after the first: ``(end - TTFT) / (tokens - 1)``) and the gaps between content chunks
(ITL). Tokens are the server's ``usage.completion_tokens`` when it sends one (``stream_options``),
else the number of content chunks. Aggregate tokens/s is all output tokens over the wall time of the
whole load level.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
    "Tell me about the history of bread.",
    "Explain why the sky is blue.",
    "Write a poem about the sea.",
    "Describe how to make a cup of tea.",
]

METRICS = ("tokens_per_s", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95", "itl_p95", "cpu_per_token")
HIGHER_IS_BETTER = {"tokens_per_s"}


@dataclass
class StreamResult:
    """One streamed request as the client saw it (seconds)."""

    ttft: float
    tokens: int
    total: float
    gaps: list[float] = field(default_factory=list)  # between successive content chunks

    @property
    def tpot(self) -> float:
        """Time per output token after the first (nan for a one-token answer)."""
        return (self.total - self.ttft) / (self.tokens - 1) if self.tokens > 1 else math.nan


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; nan ignored, nan if none left."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summarize(results: list[StreamResult], elapsed: float, failed: int = 0) -> dict[str, float]:
    """Aggregate tokens/s over ``elapsed`` wall seconds, and TTFT / TPOT / ITL percentiles of the finished
    requests; ``failed`` requests (dropped connections, errors) are counted apart and deliver no tokens."""
    ttfts = [r.ttft for r in results]
    tpots = [r.tpot for r in results]
    gaps = [gap for r in results for gap in r.gaps]
    tokens = sum(r.tokens for r in results)
    return {
        "tokens_per_s": tokens / elapsed if elapsed > 0 else math.nan,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "tpot_p50": percentile(tpots, 50),
        "tpot_p95": percentile(tpots, 95),
        "itl_p95": percentile(gaps, 95),
        "tokens": tokens,
        "requests": len(results),
        "failed": failed,
        "seconds": elapsed,
    }


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` and its children have used so far."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """``ours / theirs`` for each metric (tokens/s: above 1 is better; latencies: below 1 is better)."""
    out = {}
    for key in METRICS:
        a, b = ours.get(key, math.nan), theirs.get(key, math.nan)
        out[key] = a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
    return out


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, object]:
    """One streamed chat request, sampled the same way on every server."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        # Spelled out so every server samples alike (llama_cpp.server's own defaults are these).
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 40,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},  # ignored by servers that do not know it
    }


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> StreamResult:
    """Sends one streamed chat request for ``model`` to ``url`` and times its content chunks."""
    started = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    body = chat_body(model, prompt, max_tokens)
    async with client.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices") or []):
                stamps.append(time.perf_counter() - started)
    total = time.perf_counter() - started
    tokens = usage_tokens if usage_tokens is not None else len(stamps)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return StreamResult(stamps[0] if stamps else math.nan, tokens, total, gaps)


async def load(url: str, clients: int, max_tokens: int, rounds: int) -> dict[str, float]:
    """``clients`` concurrent streaming clients, each sending ``rounds`` requests back to back."""
    results: list[StreamResult] = []
    failures: list[str] = []

    async def client_loop(client: httpx.AsyncClient, model: str, index: int) -> None:
        for r in range(rounds):
            prompt = PROMPTS[(index + r) % len(PROMPTS)]
            try:
                results.append(await one_stream(client, url, model, prompt, max_tokens))
            except (httpx.HTTPError, RuntimeError) as exc:  # a dropped connection is a result, not the end of the run
                failures.append(f"{type(exc).__name__}: {exc}")

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        # The served model's own name: a server that routes by name answers others with 404.
        model = (await client.get(f"{url}/models", timeout=30)).json()["data"][0]["id"]
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, model, i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    if failures:
        print(f"  {url}: {len(failures)} of {clients * rounds} requests failed, first: {failures[0][:200]}", file=sys.stderr)
    return summarize(results, elapsed, len(failures))
