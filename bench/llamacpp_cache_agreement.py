"""Does a prompt continued from llama.cpp's cached KV cells score as the same prompt prefilled cold?

    .venv/bin/python bench/llamacpp_cache_agreement.py [--model smollm2] [--tokens 600]

For each flash-attention setting of the llama.cpp context (-1 auto, llama.cpp's default; 0 disabled; 1 enabled),
in a fresh process: the built-in model's engine scores the first answer token of a long prompt cold (idle cache
evicted), then again from its idle cache (all but the last prompt token reused), then cold again, and prints the
largest top-5 log-prob difference of each pair. README's serving section quotes the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def measure(model: str, tokens: int, flash_attn_type: int) -> dict[str, float]:
    """The worker: both differences for one flash-attention setting (patches the context defaults first)."""
    import llama_cpp

    defaults = llama_cpp.llama_context_default_params

    def patched() -> object:
        params = defaults()
        params.flash_attn_type = flash_attn_type
        return params

    llama_cpp.llama_context_default_params = patched
    from tandemlm.deploy.registry import load_engine
    from tandemlm.deploy.types import SamplingParams

    engine = load_engine(model, backend="llama.cpp")
    ids = engine.tokenize(" ".join(f"item{i}" for i in range(tokens)))
    messages = [{"role": "user", "content": engine.detokenize(ids[:tokens]) + "\nHow many items?"}]

    def top5() -> dict[str, float]:
        deltas = list(engine.chat(messages, SamplingParams(temperature=0, max_tokens=1, logprobs=5)))
        first = next(lp for d in deltas for lp in d.logprobs)
        return {alt.token: alt.logprob for alt in first.top}

    def gap(a: dict[str, float], b: dict[str, float]) -> float:
        return max(abs(a[t] - b[t]) for t in a.keys() & b.keys())

    engine.drop_cached_prompts()
    cold = top5()
    cached = top5()
    engine.drop_cached_prompts()
    cold_again = top5()
    return {"cold_vs_cached": gap(cold, cached), "cold_vs_cold": gap(cold, cold_again), "reused": engine.reused_tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(measure(args.model, args.tokens, args.worker)))
        return 0
    print(f"model {args.model}, a {args.tokens}-token prompt; largest top-5 log-prob difference (nats)")
    for setting, name in ((-1, "auto (default)"), (0, "disabled"), (1, "enabled")):
        command = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens), "--worker", str(setting)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"flash attention {name}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"flash attention {name:15s} cold vs cached {result['cold_vs_cached']:.4f}   cold vs cold {result['cold_vs_cold']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
