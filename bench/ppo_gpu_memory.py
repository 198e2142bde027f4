"""PPO steps with LoRA on random-initialised DeepSeek-R1-Distill-Qwen-class models: measured peak memory beside the
``--plan`` estimate, and seconds per step.

    python bench/ppo_gpu_memory.py [--sizes 0.5b,1.5b,7b] [--tokenizer FOLDER] [--out DIR] [--steps 3]
    python bench/ppo_gpu_memory.py --sizes tiny-64,tiny-256 --batch-size 2 --prompt-length 16 --response-length 8

Each size runs in a fresh process (its own peak; an out-of-memory size does not stop the others). The model is
built from a Qwen2 config with random weights directly on the device (bf16 on a GPU, fp32 on CPU): no download,
nothing written to disk. The pieces are the trainer's own (``ActorCritic``, ``TransformersSampler``,
``PPOTrainer``, ``Distributed``); the reward is a scripted score of the response text (no reward model), and the
prompts are random token ids of exactly ``--prompt-length`` tokens. Measured is ``trainer.peak_memory_mb``:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU. The plan is
``plan.estimate(plan.inputs_from_config(config, run))`` for the same run settings.

Random weights sample near-uniform tokens, so responses rarely stop early: every step runs the full response
length, the plan's worst case. Results go to ``--out`` as ``ppo_gpu_memory.json`` and ``ppo_gpu_memory.txt``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Qwen2 shapes. 1.5b and 7b are DeepSeek-R1-Distill-Qwen-1.5B / -7B's config.json; R1 has no 0.5B distill, so
# 0.5b is Qwen2.5-0.5B's (same family, tied embeddings). The tiny ones keep the real vocabulary for the tokenizer.
QWEN2_VOCAB = 151936
SIZES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": QWEN2_VOCAB, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": QWEN2_VOCAB, "tie_word_embeddings": False},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "tiny-64": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": QWEN2_VOCAB, "tie_word_embeddings": True},
    "tiny-256": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": QWEN2_VOCAB, "tie_word_embeddings": True},
}
# Shared by every size: no dropout (PPO's ratio needs it off), SDPA, the R1 distills' RoPE.
COMMON: dict[str, Any] = {
    "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "attention_dropout": 0.0,
    "use_sliding_window": False, "initializer_range": 0.02,
}
RESULT_NAME = "ppo_gpu_memory"


def qwen2_config(size: str) -> Any:
    """The transformers ``Qwen2Config`` of ``size`` (a key of :data:`SIZES`)."""
    from transformers import Qwen2Config

    if size not in SIZES:
        raise ValueError(f"--sizes: unknown size {size!r}; known: {', '.join(SIZES)}")
    return Qwen2Config(**COMMON, **SIZES[size])


def run_config(settings: dict[str, Any], cuda: bool) -> Any:
    """The ``PPORunConfig`` every size runs with: LoRA on all layers, the one-GPU defaults on a GPU."""
    from tandemlm.align.ppo.config import PPORunConfig

    return PPORunConfig(
        model="random-init", dataset="random-token-prompts", lora=True, lora_r=settings["lora_r"], lora_dropout=0.0,
        bf16=cuda, gradient_checkpointing=cuda and settings["gradient_checkpointing"],
        batch_size=settings["batch_size"], minibatch_size=settings["minibatch_size"], ppo_epochs=settings["ppo_epochs"],
        max_completion_length=settings["response_length"],
        max_length=settings["prompt_length"] + settings["response_length"], rewards="verifier", lr_scheduler="constant",
        # Random weights in bf16: the cache-vs-forward gap is reported (rollout_logprob_diff), not judged here.
        logprob_tolerance=10.0, seed=0,
    )


def scripted_score(rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
    """A cheap stand-in reward: the share of distinct characters in each response (in [0, 1])."""
    return [len(set(text)) / max(1, len(text)) for text in texts]


def measure_size(size: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Builds ``size`` on the device, runs ``steps`` PPO steps and returns measured and planned memory and times."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tandemlm.align.ppo.method import actor_critic_from_model
    from tandemlm.align.ppo.plan import MIB, estimate, inputs_from_config
    from tandemlm.align.ppo.rollout import TransformersSampler
    from tandemlm.align.ppo.scoring import RewardMix
    from tandemlm.align.ppo.trainer import Distributed, PPOTrainer, peak_memory_mb

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    c = run_config(settings, cuda)
    config = qwen2_config(size)
    plan = estimate(inputs_from_config(config, c))
    tokenizer = AutoTokenizer.from_pretrained(settings["tokenizer"])
    torch.manual_seed(c.seed)
    started = time.monotonic()
    with device:  # random init straight on the device: a 7B never exists on the host
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if c.bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    ac = actor_critic_from_model(c, model)
    built = time.monotonic() - started
    generator = torch.Generator().manual_seed(c.seed)
    rows_count = c.batch_size * settings["steps"]
    prompt_ids = torch.randint(0, len(tokenizer) - 1000, (rows_count, settings["prompt_length"]), generator=generator)
    rows = [{"prompt": []} for _ in range(rows_count)]
    reward = RewardMix([("scripted", 1.0, scripted_score)])
    sampler = TransformersSampler(tokenizer, c.max_completion_length, c.temperature, c.top_k)
    trainer = PPOTrainer(c, ac, tokenizer, rows, prompt_ids.tolist(), reward, Distributed(), settings["steps"], sampler)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for _ in range(settings["steps"]):
        stats = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        steps.append(stats)
    timed = steps[1:] or steps  # the first step warms kernels and checks the sampler's log-probs
    return {
        "size": size, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": "bf16" if c.bf16 else "fp32", "gradient_checkpointing": bool(c.gradient_checkpointing),
        "params": plan.inputs.n_params,
        "measured_peak_mb": peak_memory_mb(), "measured": "cuda max_memory_allocated" if cuda else "peak RSS",
        "plan_peak_mb": plan.total / MIB, "plan_rollout_mb": plan.rollout_phase / MIB,
        "plan_update_mb": plan.update_phase / MIB, "build_s": built,
        "step_s": sum(s["rollout_s"] + s["update_s"] for s in timed) / len(timed),
        "rollout_s": sum(s["rollout_s"] for s in timed) / len(timed),
        "update_s": sum(s["update_s"] for s in timed) / len(timed),
        "tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
        "mean_response_length": sum(s["completions/mean_length"] for s in steps) / len(steps),
        "rollout_logprob_diff": steps[0].get("rollout_logprob_diff"), "steps": len(steps),
    }


def run_size(size: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """:func:`measure_size` in a fresh process; a failure comes back as ``{"size", "error"}`` (one line)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**settings, "size": size})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {"size": size, "error": f"ran past {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"size": size, "error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def format_table(results: list[dict[str, Any]]) -> str:
    """Measured vs plan, one row per size (a failed size shows its error)."""
    header = ("size", "params", "dtype", "measured MiB", "plan MiB", "measured/plan", "s/step", "rollout s",
              "update s", "tok/s")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["size"], "-", "-", "-", "-", "-", "-", "-", "-", f"error: {r['error']}"))
            continue
        rows.append((
            r["size"], f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.1f}M", r["dtype"],
            f"{r['measured_peak_mb']:.0f}", f"{r['plan_peak_mb']:.0f}", f"{r['measured_peak_mb'] / r['plan_peak_mb']:.2f}",
            f"{r['step_s']:.2f}", f"{r['rollout_s']:.2f}", f"{r['update_s']:.2f}", f"{r['tokens_per_s']:.0f}",
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def main(argv: list[str] | None = None) -> int:
    """Runs every size, prints and writes the table and JSON; exit 1 when a size failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.5b,1.5b,7b", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the tiny Qwen2 fixture's, R1-Distill's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--minibatch-size", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="on a GPU it is on by default, as in runs")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per size")
    p.add_argument("--out", default=None, help="folder for ppo_gpu_memory.json and .txt")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one size in a fresh process
    args = p.parse_args(argv)
    if args.worker:
        settings = json.loads(args.worker)
        print(json.dumps(measure_size(settings.pop("size"), settings)))
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {', '.join(unknown)}; known: {', '.join(SIZES)}")
    tokenizer = args.tokenizer
    if tokenizer is None:
        from tandemlm.fixtures import tiny_model

        tokenizer = str(tiny_model("qwen2"))
    settings = {
        "tokenizer": tokenizer, "batch_size": args.batch_size, "minibatch_size": args.minibatch_size,
        "ppo_epochs": args.ppo_epochs, "prompt_length": args.prompt_length, "response_length": args.response_length,
        "lora_r": args.lora_r, "steps": args.steps, "gradient_checkpointing": not args.no_gradient_checkpointing,
    }
    results = []
    for size in sizes:
        print(f"ppo bench: {size} ...", flush=True)
        results.append(run_size(size, settings, args.timeout))
    table = format_table(results)
    title = (
        f"PPO with LoRA r{args.lora_r}, batch {args.batch_size}, minibatch {args.minibatch_size}, "
        f"{args.ppo_epochs} PPO epoch(s), prompt {args.prompt_length} + response {args.response_length}; "
        "measured peak vs plan.estimate"
    )
    print(f"{title}\n{table}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{RESULT_NAME}.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
        (out / f"{RESULT_NAME}.txt").write_text(f"{title}\n{table}\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
