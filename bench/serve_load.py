"""Concurrent streaming load: `tandem serve` vs `python -m llama_cpp.server` on the same GGUF.

Starts each server on loopback (one at a time, so they don't share the CPU), runs 1, 4 and 8
concurrent streaming chat clients (each sends --rounds requests back to back), and prints
aggregate tokens/s, time to first token (p50/p95) and tandem's ratio over llama-cpp-python's
server (interrupts off, so it serves requests in turn). llama_cpp.server runs twice: at its own
default thread count, as users get it, and at tandem's, so the batching gain shows on its own.

    .venv/bin/python bench/serve_load.py [--model smollm2] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tandemlm.hardware import physical_cores
from tandemlm.models.resolve import resolve_model

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(command: list[str], port: int) -> Iterator[str]:
    # A log file, not a pipe: llama.cpp logs enough at load to fill a pipe and block the server.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not come up in 180 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """Returns (time to first token, tokens, total seconds) for one streamed chat request."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        # Spelled out so both servers sample alike (llama_cpp.server's own defaults are these).
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 40,
        "seed": 1,
        "stream": True,
    }
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    tokens += 1
                    if first is None:
                        first = time.perf_counter() - started
    return (first or float("nan")), tokens, time.perf_counter() - started


async def load(url: str, clients: int, max_tokens: int, rounds: int) -> dict[str, float]:
    """``clients`` concurrent clients, each sending ``rounds`` requests back to back."""
    results: list[tuple[float, int, float]] = []

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for r in range(rounds):
            results.append(await one_stream(client, url, PROMPTS[(index + r) % len(PROMPTS)], max_tokens))

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    ttfts = sorted(ttft for ttft, _, _ in results)
    total_tokens = sum(n for _, n, _ in results)
    return {
        "tokens_per_s": total_tokens / elapsed,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "tokens": total_tokens,
    }


def raw_default_threads() -> int:
    """llama_cpp.server's own default for --n_threads (half the logical CPUs)."""
    return max((os.cpu_count() or 2) // 2, 1)


# Modules `python -m llama_cpp.server` imports that llama-cpp-python's [server] extra provides.
RAW_SERVER_MODULES = {"starlette_context": "starlette-context", "sse_starlette": "sse-starlette", "pydantic_settings": "pydantic-settings"}


def missing_raw_server_packages() -> list[str]:
    """The [server]-extra packages llama_cpp.server needs that are not installed here."""
    return [package for module, package in RAW_SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--threads", type=int, default=None,
                        help="tandem's threads (default: its own default, one per physical core)")
    args = parser.parse_args()
    missing = missing_raw_server_packages()
    if missing:  # one line, not llama_cpp.server's traceback from inside a child process
        sys.exit(f"llama_cpp.server needs {' '.join(missing)} (llama-cpp-python's [server] extra): "
                 f"run `bash scripts/setup.sh --dev` or `{sys.executable} -m pip install {' '.join(missing)}`")
    gguf = str(resolve_model(args.model).gguf_file())
    levels = [int(x) for x in args.concurrency.split(",")]
    port = free_port()
    threads = args.threads or physical_cores()
    tandem = [sys.executable, "-m", "tandemlm.cli.main", "serve", gguf, "--port", str(port),
              "--n-ctx", "4096", "--n-parallel", str(max(levels))]
    raw = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
           "--n_ctx", "4096", "--interrupt_requests", "False"]
    # Both as they ship (each picks its own thread count), and llama_cpp.server given tandem's
    # thread count, so the batching gain is shown apart from the thread-count default.
    commands = {f"tandem ({threads} thr)": tandem + (["--n-threads", str(args.threads)] if args.threads else [])}
    baselines = [f"llama_cpp.server ({raw_default_threads()} thr, default)"]
    commands[baselines[0]] = raw
    if threads != raw_default_threads():
        baselines.append(f"llama_cpp.server ({threads} thr)")
        commands[baselines[1]] = [*raw, "--n_threads", str(threads)]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, command in commands.items():
        with server(command, port) as url:
            asyncio.run(load(url, 1, 8, 1))  # warm-up
            results[name] = {n: asyncio.run(load(url, n, args.max_tokens, args.rounds)) for n in levels}
    ours_name = next(iter(commands))
    width = max(len(name) for name in commands) + 8
    print(f"model {args.model} ({gguf}), {args.max_tokens} tokens per request, {args.rounds} rounds, {os.cpu_count()} CPUs")
    print(f"{'clients':>7} | {'server':<{width}} | {'tok/s':>7} | {'TTFT p50':>8} | {'TTFT p95':>8} | {'tokens':>6}")
    for n in levels:
        for name in commands:
            r = results[name][n]
            print(f"{n:>7} | {name:<{width}} | {r['tokens_per_s']:7.1f} | {r['ttft_p50']:7.2f}s | {r['ttft_p95']:7.2f}s | {r['tokens']:6.0f}")
        ours = results[ours_name][n]
        for name in baselines:
            theirs = results[name][n]
            label = "ratio vs " + name.split(" ", 1)[1]
            print(f"{n:>7} | {label:<{width}} | {ours['tokens_per_s'] / theirs['tokens_per_s']:6.2f}x | "
                  f"{ours['ttft_p50'] / theirs['ttft_p50']:7.2f}x | {ours['ttft_p95'] / theirs['ttft_p95']:7.2f}x")


if __name__ == "__main__":
    main()
