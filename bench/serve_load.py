"""Concurrent streaming load: `tandem serve` vs llama.cpp's own `llama-server` (and llama_cpp.server).

Same GGUF, same threads, same slots (`--n-parallel` = `-np` = the largest client count) and the same
total context (both split one KV budget across slots). Servers run one at a time on loopback so they
don't share the CPU. For each level of concurrent streaming chat clients (each sends --rounds
requests back to back) it prints aggregate output tokens/s, TTFT p50/p95, time per output token
p50/p95, inter-token latency p95, and tandem's ratio over llama-server (the anchor) and over
llama-cpp-python's own server (interrupts off, so it serves requests in turn; at its default thread
count as users get it, and at tandem's). Then the transformers backend at the largest level against
its own one-client rate. Targets: at 8 and 16 clients, TTFT p95 <= 1.0x and tokens/s >= 1.0x
llama-server. llama-server is built from the llama.cpp that the installed llama-cpp-python vendors
on first use (bench/build_llama_server.py onto tandemlm/llamacpp/programs.py; minutes on 2 cores, cached).

    .venv/bin/python bench/serve_load.py [--model smollm2] [--max-tokens 64] [--rounds 2] [--json out.json]
    .venv/bin/python bench/serve_load.py --quick     # smoke run: 1 and 4 clients, short answers
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also when loaded by file path

from _serve_clients import METRICS, cpu_seconds, load, ratios
from build_llama_server import llama_server_binary

from tandemlm.hardware import physical_cores
from tandemlm.models.resolve import resolve_model

ALL_SERVERS = ("tandem", "llama-server", "llama_cpp.server", "transformers")
TARGET_LEVELS = (8, 16)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server(command: list[str], port: int) -> Iterator[tuple[str, int]]:
    """Runs ``command`` until its ``/v1/models`` answers 200; yields the ``/v1`` base URL and the server's
    PID, then stops it."""
    # A log file, not a pipe: llama.cpp logs enough at load to fill a pipe and block the server.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{command[0]} exited: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError(f"{command[0]} did not come up in 300 s")
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def raw_default_threads() -> int:
    """llama_cpp.server's own default for --n_threads (half the logical CPUs)."""
    return max((os.cpu_count() or 2) // 2, 1)


# Modules `python -m llama_cpp.server` imports that llama-cpp-python's [server] extra provides.
RAW_SERVER_MODULES = {
    "starlette_context": "starlette-context",
    "sse_starlette": "sse-starlette",
    "pydantic_settings": "pydantic-settings",
}


def missing_raw_server_packages() -> list[str]:
    """The [server]-extra packages llama_cpp.server needs that are not installed here."""
    return [package for module, package in RAW_SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's flags; ``--quick`` shrinks the run to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a GGUF (built-in name or .gguf path)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="run the servers in turn this many times and report each metric's median (this machine is noisy)",
    )
    parser.add_argument("--concurrency", default="1,4,8,16", help="client counts, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--ctx-per-slot", type=int, default=256, help="context per slot (total = this x slots)")
    parser.add_argument(
        "--kv-layout", default="split", choices=("split", "unified"),
        help="tandem's --kv-layout (default split: llama-server's own layout at -np N, a KV stream per slot)",
    )
    parser.add_argument("--servers", default=",".join(ALL_SERVERS), help=f"subset of {','.join(ALL_SERVERS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,4 clients, 16 tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.rounds = "1,4", 16, 1
    args.levels = [int(x) for x in args.concurrency.split(",")]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := set(args.servers) - set(ALL_SERVERS):
        parser.error(f"--servers: unknown {sorted(unknown)}; known: {', '.join(ALL_SERVERS)}")
    return args


def server_commands(args: argparse.Namespace, gguf: str, port: int) -> dict[str, list[str]]:
    """Name -> command line of each llama.cpp-based server to measure, the anchor (llama-server) first."""
    threads, slots = args.threads or physical_cores(), max(args.levels)
    n_ctx = str(args.ctx_per_slot * slots)  # both servers split one total across their slots
    commands: dict[str, list[str]] = {}
    if "llama-server" in args.servers:
        flags = f"--host 127.0.0.1 --port {port} -t {threads} -np {slots} -c {n_ctx} --no-webui"
        commands["llama-server"] = [str(llama_server_binary()), "-m", gguf, *flags.split()]
    if "tandem" in args.servers:
        flags = f"--port {port} --backend llama.cpp --n-ctx {n_ctx} --n-parallel {slots} --n-threads {threads}"
        flags += f" --kv-layout {args.kv_layout}"
        commands["tandem"] = [sys.executable, "-m", "tandemlm.cli.main", "serve", gguf, *flags.split()]
    if "llama_cpp.server" in args.servers:
        flags = f"--port {port} --n_ctx {n_ctx} --interrupt_requests False"
        raw = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, *flags.split()]
        if not args.quick and threads != raw_default_threads():  # as it ships, too
            commands[f"llama_cpp.server {raw_default_threads()} thr (default)"] = raw
        commands[f"llama_cpp.server {threads} thr"] = [*raw, "--n_threads", str(threads)]
    return commands


def measure(command: list[str], port: int, levels: list[int], args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """Starts one server, warms it up, and runs each load level against it; also the server's own CPU
    seconds per generated token (its process and children), which a shared machine's noise moves far
    less than wall time."""
    with server(command, port) as (url, pid):
        asyncio.run(load(url, 1, 8, 1))  # warm-up
        out = {}
        for n in levels:
            before = cpu_seconds(pid)
            out[n] = asyncio.run(load(url, n, args.max_tokens, args.rounds))
            used = cpu_seconds(pid) - before
            out[n]["cpu_per_token"] = used / out[n]["tokens"] if out[n]["tokens"] else math.nan
            print(f"  {n:>2} clients: {out[n]['tokens_per_s']:.1f} tok/s, {out[n]['cpu_per_token'] * 1000:.1f} CPU ms/token", file=sys.stderr)
        return out


def median_by_level(measured: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Each level's metrics as the median over repeated runs (NaNs left out; NaN when every run lacks it)."""
    out: dict[int, dict[str, float]] = {}
    for n in measured[0]:
        keys = {key for run in measured for key in run[n]}
        out[n] = {}
        for key in keys:
            values = [run[n][key] for run in measured if not math.isnan(run[n].get(key, math.nan))]
            out[n][key] = statistics.median(values) if values else math.nan
    return out


def _ms(value: float) -> str:
    return f"{value * 1000:8.0f}" if not math.isnan(value) else "     nan"


def header(width: int) -> str:
    """The table's column titles."""
    titles = " | ".join(f"{t:>8}" for t in ("TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95", "ITL p95", "CPU/tok"))
    return f"{'clients':>7} | {'server':<{width}} | {'tok/s':>7} | {titles} | {'tokens':>6} | {'failed':>6}"


def row(n: int, name: str, r: dict[str, float], width: int) -> str:
    """One table line of absolute numbers (latencies in ms)."""
    lat = " | ".join(_ms(r.get(k, math.nan)) for k in METRICS[1:])
    return f"{n:>7} | {name:<{width}} | {r['tokens_per_s']:7.1f} | {lat} | {r['tokens']:6.0f} | {r.get('failed', 0):6.0f}"


def ratio_row(n: int, label: str, q: dict[str, float], width: int) -> str:
    """One table line of ratios ours/theirs (tok/s: above 1 is better; latencies: below 1 is better)."""
    cells = " | ".join(f"{q[k]:7.2f}x" for k in METRICS[1:])
    return f"{n:>7} | {label:<{width}} | {q['tokens_per_s']:6.2f}x | {cells} |"


def target_lines(ours: dict[int, dict[str, float]], anchor: dict[int, dict[str, float]]) -> list[str]:
    """Whether tandem meets TTFT p95 <= 1.0x, tokens/s >= 1.0x and CPU seconds per token <= 1.0x llama-server
    at 8 and 16 clients (a CPU ratio not measured counts as not met)."""
    lines = []
    for n in TARGET_LEVELS:
        if n in ours and n in anchor:
            q = ratios(ours[n], anchor[n])
            met = q["ttft_p95"] <= 1.0 and q["tokens_per_s"] >= 1.0 and q["cpu_per_token"] <= 1.0
            lines.append(
                f"target at {n:>2} clients (TTFT p95 <= 1.0x, tok/s >= 1.0x, CPU/token <= 1.0x llama-server): "
                f"TTFT p95 {q['ttft_p95']:.2f}x, tok/s {q['tokens_per_s']:.2f}x, CPU/token {q['cpu_per_token']:.2f}x "
                f"-> {'met' if met else 'MISSED'}"
            )
    return lines


def main() -> None:
    """Runs every selected server at every level and prints the tables."""
    args = parse_args()
    if "llama_cpp.server" in args.servers and (missing := missing_raw_server_packages()):
        # One line, not llama_cpp.server's traceback from inside a child process.
        sys.exit(
            f"llama_cpp.server needs {' '.join(missing)} (llama-cpp-python's [server] extra): "
            f"run `bash scripts/setup.sh --dev` or `{sys.executable} -m pip install {' '.join(missing)}`"
        )
    gguf = str(resolve_model(args.model).gguf_file())
    port = free_port()
    commands = server_commands(args, gguf, port)
    runs: dict[str, list[dict[int, dict[str, float]]]] = {name: [] for name in commands}
    loads: dict[str, float] = {}  # the machine's 1-minute load average as each server started (others' work)
    for repeat in range(args.repeats):  # servers alternate, so a slow spell of the machine hits each of them
        for name, command in commands.items():
            print(f"{name} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr)
            loads[name] = max(loads.get(name, 0.0), os.getloadavg()[0])
            runs[name].append(measure(command, port, args.levels, args))
    results = {name: median_by_level(measured) for name, measured in runs.items()}
    hf_levels = sorted({1, min(8, max(args.levels))})
    if "transformers" in args.servers:
        print("tandem transformers ...", file=sys.stderr)
        loads["tandem transformers"] = os.getloadavg()[0]
        flags = f"--port {port} --backend transformers --n-parallel {max(hf_levels)}"
        hf = [sys.executable, "-m", "tandemlm.cli.main", "serve", args.model, *flags.split()]
        results["tandem transformers"] = measure(hf, port, hf_levels, args)

    threads = args.threads or physical_cores()
    version = importlib.metadata.version("llama-cpp-python")
    print(
        f"\n{date.today()} | {cpu_name()}, {os.cpu_count()} CPUs | model {args.model} ({Path(gguf).name}) | "
        f"llama-cpp-python {version} | {threads} threads, {max(args.levels)} slots, "
        f"{args.ctx_per_slot} ctx/slot, tandem --kv-layout {args.kv_layout} | {args.max_tokens} tokens/request, {args.rounds} rounds, median of {args.repeats} | latencies in ms"
    )
    names = [name for name in commands if name in results]
    width = max([len(f"tandem / {n}") for n in names] + [len("tandem transformers")])
    print(header(width))
    for n in args.levels:
        for name in names:
            print(row(n, name, results[name][n], width))
        if "tandem" in results:
            for name in (other for other in names if other != "tandem"):
                q = ratios(results["tandem"][n], results[name][n])
                print(ratio_row(n, f"tandem / {name}", q, width))
    if "tandem" in results and "llama-server" in results:
        print("\n".join(["", *target_lines(results["tandem"], results["llama-server"])]))
        if args.repeats > 1:
            for n in TARGET_LEVELS:
                paired = [ratios(t[n], a[n]) for t, a in zip(runs["tandem"], runs["llama-server"], strict=True) if n in t]
                if paired:
                        print(f"{n:>2} clients, each repeat's pair: tok/s " + " ".join(f"{q['tokens_per_s']:.2f}x" for q in paired)
                          + ", CPU/token " + " ".join(f"{q['cpu_per_token']:.2f}x" for q in paired))
    if "tandem transformers" in results:
        hf_results = results["tandem transformers"]
        print(f"\ntransformers backend ({args.model}, fp32, --n-parallel {max(hf_levels)}):")
        for n in hf_levels:
            print(row(n, "tandem transformers", hf_results[n], width))
        if len(hf_levels) == 2:
            top = hf_levels[-1]
            print(ratio_row(top, f"{top} clients / 1 client", ratios(hf_results[top], hf_results[1]), width))
    print("\nhighest load average (1 min) as each server started: " + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()))
    if args.json:
        meta = {"date": str(date.today()), "cpu": cpu_name(), "cpus": os.cpu_count(), "model": args.model}
        meta |= {"llama_cpp_python": version, "threads": threads, "slots": max(args.levels), "load_average": loads}
        meta |= {"ctx_per_slot": args.ctx_per_slot, "kv_layout": args.kv_layout, "max_tokens": args.max_tokens, "rounds": args.rounds}
        meta |= {"repeats": args.repeats}
        args.json.write_text(json.dumps({"meta": meta, "commands": commands, "results": results}, indent=1))


if __name__ == "__main__":
    main()
