"""N-gram speculative decoding on a repetitive workload: tandem with and without ``--speculative ngram``,
beside llama.cpp's own ``llama-server`` with and without its n-gram mode, on the same GGUF.

The workload copies text the prompt gives (a JSON record repeated or edited, a code block with a
renamed variable), greedy, one request at a time, the case where drafting from n-gram matches pays.
Every server runs alone with the same threads, one slot and the same context; each gets one warm-up
request, then the prompts in order. Tokens/s is completion tokens over each request's wall time
(prefill included, the same for all). Acceptance is drafts kept over drafts checked (tandem's
``/metrics``, llama-server's ``timings``). The two tandem runs must answer identically (checked).

    .venv/bin/python bench/speculative.py            # every prompt, 256 tokens each
    .venv/bin/python bench/speculative.py --quick    # smoke run: two prompts, 64 tokens
    .venv/bin/python bench/speculative.py --servers tandem   # without llama-server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also when loaded by file path

from build_llama_server import llama_server_binary
from serve_load import cpu_name, free_port, server

from tandemlm.hardware import physical_cores
from tandemlm.models.resolve import resolve_model

RECORDS = [
    {"id": 1, "name": "Ada Lovelace", "born": 1815, "field": "mathematics", "city": "London"},
    {"id": 2, "name": "Alan Turing", "born": 1912, "field": "computer science", "city": "Manchester"},
    {"id": 3, "name": "Grace Hopper", "born": 1906, "field": "programming languages", "city": "New York"},
    {"id": 4, "name": "Edsger Dijkstra", "born": 1930, "field": "algorithms", "city": "Rotterdam"},
]
CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""
PROMPTS = [
    f"Repeat this JSON exactly, nothing else:\n{json.dumps(RECORDS, indent=2)}",
    f"Rename the variable `items` to `products` in this code and print the whole code:\n```python\n{CODE}```",
    f"Return this JSON with every city in upper case, nothing else:\n{json.dumps(RECORDS, indent=2)}",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a GGUF (built-in name or .gguf path)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--servers", default="tandem,llama-server", help="subset of tandem,llama-server")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: two prompts, 64 tokens")
    args = parser.parse_args(argv)
    args.prompts = PROMPTS[:2] if args.quick else PROMPTS
    if args.quick:
        args.max_tokens = min(args.max_tokens, 64)
    return args


def configurations(args: argparse.Namespace, gguf: str, port: int) -> dict[str, list[str]]:
    """Name -> command line of each server to measure; plain first, then its n-gram mode."""
    threads = args.threads or physical_cores()
    servers = set(args.servers.split(","))
    commands: dict[str, list[str]] = {}
    if "tandem" in servers:
        flags = f"--port {port} --backend llama.cpp --n-ctx 2048 --n-parallel 1 --n-threads {threads}"
        tandem = [sys.executable, "-m", "tandemlm.cli.main", "serve", gguf, *flags.split()]
        commands["tandem"] = tandem
        commands["tandem --speculative ngram"] = [*tandem, "--speculative", "ngram"]
    if "llama-server" in servers:
        flags = f"--host 127.0.0.1 --port {port} -t {threads} -np 1 -c 2048 --no-webui"
        anchor = [str(llama_server_binary()), "-m", gguf, *flags.split()]
        commands["llama-server"] = anchor
        commands["llama-server ngram-simple"] = [*anchor, "--spec-type", "ngram-simple"]  # its defaults: n 12, m 48
        if not args.quick:  # with the lookup and draft lengths of ours
            sizes = "--spec-ngram-simple-size-n 4 --spec-ngram-simple-size-m 10"
            commands["llama-server ngram-simple n4 m10"] = [*anchor, "--spec-type", "ngram-simple", *sizes.split()]
    return commands


def spec_counters(base: str) -> tuple[float, float]:
    """tandem's (drafted, accepted) token counters from ``/metrics``; zeros where it has none."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()[:2]
            values[name] = float(value)
    return values.get("tandem_spec_draft_tokens_total", 0.0), values.get("tandem_spec_accepted_tokens_total", 0.0)


def ask(url: str, model: str, prompt: str, max_tokens: int) -> tuple[dict, float]:
    """One greedy chat completion: the reply and its wall time."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    started = time.perf_counter()
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json(), time.perf_counter() - started


def measure(command: list[str], port: int, args: argparse.Namespace, tandem: bool) -> dict[str, object]:
    """Tokens, seconds, tokens/s, drafts checked and kept, and the answers of one server over the prompts."""
    with server(command, port) as (url, _pid):
        model = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
        base = url.removesuffix("/v1")
        ask(url, model, "Say hello.", 8)  # warm-up: first-call allocations off the clock
        drafted0, accepted0 = spec_counters(base) if tandem else (0.0, 0.0)
        tokens, seconds, drafted, accepted, texts = 0, 0.0, 0.0, 0.0, []
        for prompt in args.prompts:
            reply, elapsed = ask(url, model, prompt, args.max_tokens)
            tokens += reply["usage"]["completion_tokens"]
            seconds += elapsed
            texts.append(reply["choices"][0]["message"]["content"])
            timings = reply.get("timings", {})  # llama-server's own counts
            drafted += timings.get("draft_n", 0)
            accepted += timings.get("draft_n_accepted", 0)
        if tandem:
            drafted1, accepted1 = spec_counters(base)
            drafted, accepted = drafted1 - drafted0, accepted1 - accepted0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "drafted": drafted,
        "accepted": accepted,
        "texts": texts,
    }


def main() -> None:
    """Runs every configuration in turn and prints the table."""
    args = parse_args()
    gguf = str(resolve_model(args.model).gguf_file())
    port = free_port()
    results: dict[str, dict[str, object]] = {}
    loads: dict[str, float] = {}
    for name, command in configurations(args, gguf, port).items():
        print(f"{name} ...", file=sys.stderr)
        loads[name] = os.getloadavg()[0]
        results[name] = measure(command, port, args, tandem=name.startswith("tandem"))
    threads = args.threads or physical_cores()
    print(
        f"\n{date.today()} | {cpu_name()}, {os.cpu_count()} CPUs, {threads} threads | model {args.model} "
        f"({Path(gguf).name}) | {len(args.prompts)} prompts x {args.max_tokens} tokens, greedy, one at a time"
    )
    print(f"{'server':36} {'tokens':>7} {'tok/s':>8} {'vs plain':>9} {'drafted':>8} {'accepted':>9}  load")
    for name, r in results.items():
        plain = results.get("tandem" if name.startswith("tandem") else "llama-server", r)
        rate = f"{r['accepted'] / r['drafted']:.0%}" if r["drafted"] else "-"
        speedup = f"{r['tok_s'] / plain['tok_s']:.2f}x"
        print(
            f"{name:36} {r['tokens']:>7} {r['tok_s']:>8.1f} {speedup:>9} {int(r['drafted']):>8} "
            f"{int(r['accepted']):>5} {rate:>3}  {loads[name]:.2f}"
        )
    for name, r in results.items():  # each n-gram mode against its own server's plain answers
        plain = results.get("tandem" if name.startswith("tandem") else "llama-server")
        if plain is not None and plain is not r:
            same = "yes" if r["texts"] == plain["texts"] else "no"
            print(f"{name}: answers identical to plain decoding: {same}")
    if max(loads.values()) > 0.5 * (os.cpu_count() or 1):
        print("note: the machine was busy with other work during the run (load column); timings are rough")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "loads": loads}, indent=2))


if __name__ == "__main__":
    main()
