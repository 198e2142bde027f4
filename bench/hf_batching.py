"""Continuous batching in the transformers backend: aggregate tokens/s of N concurrent streams over the
same requests served one at a time, on the same engine. Target: >= 3x at 8 streams.

    .venv/bin/python bench/hf_batching.py [--model smollm2] [--streams 8] [--max-tokens 64] [--stagger 0.2] [--threads N]

Greedy decoding with end-of-generation tokens banned, so every request makes exactly --max-tokens
tokens on either side. The concurrent run starts the streams --stagger seconds apart: with static
batches a late stream would wait for the whole batch before it; with continuous batching it joins
the running batch at the next step. It prints the largest number of rows one decode step held.
On a machine whose cores other processes keep busy, torch's threads spin against them; --threads 1
then gives the steadier numbers.
"""

from __future__ import annotations

import argparse
import threading
import time

from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams

PROMPTS = [
    "The history of the printing press begins",
    "A recipe for bread needs flour, water and",
    "The three largest planets in the solar system are",
    "Once upon a time, in a small village by the sea,",
    "To learn a new language quickly, the best approach is",
    "The main causes of the French Revolution were",
    "A good night's sleep depends on",
    "The difference between weather and climate is",
]


def one_at_a_time(engine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Tokens/s of the requests run back to back."""
    tokens, started = 0, time.perf_counter()
    for ids in prompts:
        tokens += sum(1 for _ in engine.stream_tokens(ids, params))
    return tokens / (time.perf_counter() - started)


def concurrent(engine, prompts: list[list[int]], params: SamplingParams, stagger: float) -> float:
    """Aggregate tokens/s of the requests streamed from one thread each, started ``stagger`` s apart."""
    counts = [0] * len(prompts)

    def run(i: int) -> None:
        counts[i] = sum(1 for _ in engine.stream_tokens(prompts[i], params))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stagger", type=float, default=0.2, help="seconds between the concurrent streams' starts")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = load_engine(args.model, backend="transformers", max_batch_size=args.streams)
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logit_bias={t: -100.0 for t in engine._eos})
        prompts = [engine.tokenize(PROMPTS[i % len(PROMPTS)], add_special_tokens=True) for i in range(args.streams)]
        one_at_a_time(engine, prompts[:1], params)  # warm-up
        solo = one_at_a_time(engine, prompts, params)
        engine.max_batch_rows = 0
        together = concurrent(engine, prompts, params, args.stagger)
        widest = engine.max_batch_rows
    finally:
        engine.close()
    threads = f"{args.threads} torch threads" if args.threads else "default torch threads"
    print(
        f"model {args.model}, transformers backend, greedy, {args.max_tokens} tokens x {args.streams} requests, {threads}"
    )
    print(f"{'one at a time':<28} {solo:8.1f} tok/s")
    print(f"{f'{args.streams} streams, {args.stagger}s apart':<28} {together:8.1f} tok/s  (widest step: {widest} rows)")
    print(f"{'ratio':<28} {together / solo:8.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
