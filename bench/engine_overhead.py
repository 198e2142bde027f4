"""Tokens/s of tandem's engines against the raw library calls they wrap, on the same model and prompts.

    .venv/bin/python bench/engine_overhead.py [--model smollm2] [--max-tokens 64] [--backends llama.cpp,transformers]

Greedy decoding, one request at a time; each side runs the same prompts after one warm-up call.
A ratio near 1.0 means tandem's scheduling, sampling and streaming add little on top of the library.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from tandemlm.deploy.engine import collect
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.models.resolve import resolve_model

PROMPTS = [
    "The history of the printing press begins",
    "A recipe for bread needs flour, water and",
    "The three largest planets in the solar system are",
    "Once upon a time, in a small village by the sea,",
]


def timed(run: Callable[[str], int], prompts: list[str]) -> float:
    run(prompts[0])  # warm-up
    tokens, started = 0, time.perf_counter()
    for prompt in prompts:
        tokens += run(prompt)
    return tokens / (time.perf_counter() - started)


def bench_llamacpp(model: str, max_tokens: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    gguf = str(resolve_model(model).gguf_file())
    raw = Llama(gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run_raw(prompt: str) -> int:
        raw.reset()  # no prefix reuse: each prompt is decoded from scratch, as on our side
        out = raw.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        return out["usage"]["completion_tokens"]

    raw_tps = timed(run_raw, PROMPTS)
    raw.close()
    engine = load_engine(model, backend="llama.cpp", n_ctx=2048, n_threads=threads, n_parallel=1)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ours = timed(lambda p: collect(engine.generate(p, params)).usage.completion_tokens, PROMPTS)
    engine.close()
    return raw_tps, ours


def bench_transformers(model: str, max_tokens: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(model).hf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    raw = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run_raw(prompt: str) -> int:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = raw.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    raw_tps = timed(run_raw, PROMPTS)
    engine = load_engine(model, backend="transformers")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ours = timed(lambda p: collect(engine.generate(p, params)).usage.completion_tokens, PROMPTS)
    engine.close()
    return raw_tps, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backends", default="llama.cpp,transformers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        if backend == "llama.cpp":
            rows.append(("llama.cpp", "llama_cpp.Llama.create_completion", *bench_llamacpp(args.model, args.max_tokens, args.threads)))
        elif backend == "transformers":
            rows.append(("transformers", "model.generate", *bench_transformers(args.model, args.max_tokens)))
        else:
            raise SystemExit(f"error: --backends: unknown backend {backend!r} (llama.cpp, transformers)")
    print(f"model {args.model}, greedy, {args.max_tokens} new tokens x {len(PROMPTS)} prompts, one at a time")
    print(f"{'backend':<13} | {'raw call':<34} | {'raw tok/s':>9} | {'tandem tok/s':>12} | {'ratio':>6}")
    for backend, raw_name, raw_tps, ours in rows:
        print(f"{backend:<13} | {raw_name:<34} | {raw_tps:9.1f} | {ours:12.1f} | {ours / raw_tps:5.2f}x")


if __name__ == "__main__":
    main()
