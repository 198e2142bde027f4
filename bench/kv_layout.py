"""The llama.cpp engine's two KV layouts under many concurrent streams: ``--kv-layout unified`` against ``split``.

    .venv/bin/python bench/kv_layout.py [--model smollm2] [--clients 16] [--max-tokens 64] [--ctx-per-slot 256] [--repeats 3]

In-process engines (no HTTP), one at a time and alternating: ``--clients`` threads each stream ``--rounds``
chat requests back to back (the prompts of bench/serve_load.py, sampled alike) from an engine of that many slots
and ``--ctx-per-slot`` cells each. Prints tokens/s and the process's CPU ms per token (median over repeats), and
the median time of a ``llama_decode`` step that carries one token for every client (the steady decode step: in
the unified layout each row's attention scans every sequence's cells, in the split layout only its own stream's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers, also when loaded by file path

from _serve_clients import PROMPTS

from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.hardware import physical_cores


class TimedDecode:
    """llama_cpp's bindings with ``llama_decode`` timed: the seconds of each call, by batch size."""

    def __init__(self, bindings) -> None:
        self._bindings = bindings
        self.seconds: dict[int, list[float]] = {}

    def __getattr__(self, name: str):
        return getattr(self._bindings, name)

    def llama_decode(self, ctx, batch) -> int:
        started = time.perf_counter()
        status = self._bindings.llama_decode(ctx, batch)
        self.seconds.setdefault(batch.n_tokens, []).append(time.perf_counter() - started)
        return status


def run(layout: str, args: argparse.Namespace) -> dict[str, float]:
    """One engine in ``layout`` under the load; tokens/s, CPU ms per token and the full decode step's median ms."""
    engine = load_engine(
        args.model, backend="llama.cpp", n_ctx=args.ctx_per_slot * args.clients, n_parallel=args.clients,
        n_threads=args.threads or physical_cores(), kv_layout=layout,
    )
    timed = engine._ll = TimedDecode(engine._ll)  # the scheduler looks its bindings up on each call
    prompts = [engine.tokenize(engine.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
    tokens = [0] * args.clients
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, top_k=40, seed=1)

    def client(index: int) -> None:
        for r in range(args.rounds):
            for _ in engine.stream_tokens(prompts[(index + r) % len(prompts)], params):
                tokens[index] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    cpu, started = os.times(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, after = time.perf_counter() - started, os.times()
    engine.close()
    used = (after.user - cpu.user) + (after.system - cpu.system)
    full = timed.seconds.get(args.clients, [])
    return {
        "tokens_per_s": sum(tokens) / wall,
        "cpu_ms_per_token": used / sum(tokens) * 1000,
        "full_step_ms": statistics.median(full) * 1000 if full else float("nan"),
    }


def main() -> None:
    """Alternates the layouts ``--repeats`` times and prints each metric's median and split / unified."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a GGUF (built-in name or .gguf path)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends back to back")
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (longer: more cells a sequence)")
    parser.add_argument("--ctx-per-slot", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"unified": [], "split": []}
    for _ in range(args.repeats):
        for layout, measured in runs.items():
            measured.append(run(layout, args))
    medians = {layout: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for layout, rs in runs.items()}
    print(f"{args.clients} clients x {args.rounds} rounds x {args.max_tokens} tokens, {args.ctx_per_slot} cells a slot, "
          f"{args.threads or physical_cores()} threads, median of {args.repeats}")
    print(f"{'layout':<16} | {'tok/s':>7} | {'CPU ms/token':>12} | {'full step ms':>12}")
    for layout, m in medians.items():
        print(f"{layout:<16} | {m['tokens_per_s']:7.1f} | {m['cpu_ms_per_token']:12.2f} | {m['full_step_ms']:12.1f}")
    q = {k: medians["split"][k] / medians["unified"][k] for k in medians["split"]}
    print(f"{'split / unified':<16} | {q['tokens_per_s']:6.2f}x | {q['cpu_ms_per_token']:11.2f}x | {q['full_step_ms']:11.2f}x")


if __name__ == "__main__":
    main()
