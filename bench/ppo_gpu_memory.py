"""PPO steps with LoRA on random-initialised DeepSeek-R1-Distill-Qwen-class models: measured peak memory beside the
``--plan`` estimate, and seconds per step.

    python bench/ppo_gpu_memory.py [--sizes 0.5b,1.5b,7b] [--tokenizer FOLDER] [--out DIR] [--steps 3]
    python bench/ppo_gpu_memory.py --sizes tiny-64,tiny-256 --batch-size 2 --prompt-length 16 --response-length 8

Each size runs in a fresh process (its own peak; an out-of-memory size does not stop the others), under
``--timeout`` and, with ``--budget``, within the GPU check's time. The model is built from a Qwen2 config with random
weights directly on the device (bf16 on a GPU, fp32 on CPU): no download, nothing written to disk. Those pieces and
the table are ``_gpu_bench.py``'s, shared with ``align_gpu_memory.py`` (DPO, and GRPO on this same trainer machinery:
``measure_rl``). The pieces are the trainer's own (``ActorCritic``, ``TransformersSampler``, ``PPOTrainer``,
``Distributed``); the reward is a scripted score of the response text (no reward model), and the prompts are random
token ids of exactly ``--prompt-length`` tokens. Measured is ``trainer.peak_memory_mb``:
``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on CPU. The plan is
``plan.estimate(plan.inputs_from_config(config, run))`` for the same run settings.

Random weights sample near-uniform tokens, so responses rarely stop early: every step runs the full response
length, the plan's worst case. Results go to ``--out`` as ``ppo_gpu_memory.json`` and ``ppo_gpu_memory.txt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _gpu_bench import (
    SIZES,
    default_tokenizer,
    failed,
    format_table,
    measure_rl,
    not_run_row,
    params_label,
    parse_list,
    report,
    run_jobs,
    run_worker,
)

RESULT_NAME = "ppo_gpu_memory"


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


def measure_size(job: dict[str, Any]) -> dict[str, Any]:
    """Builds ``job["size"]`` on the device, runs ``steps`` PPO steps; returns measured and planned memory and times."""
    import torch

    from tandemlm.align.ppo.trainer import PPOTrainer

    result, _ = measure_rl(job, run_config(job, torch.cuda.is_available()), PPOTrainer)
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Measured vs plan, one row per size (a failed or skipped size shows why)."""
    header = ("size", "params", "dtype", "measured MiB", "plan MiB", "measured/plan", "s/step", "rollout s",
              "update s", "tok/s")
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append(not_run_row(r, (r["size"],), len(header)))
            continue
        rows.append((
            r["size"], params_label(r["params"]), r["dtype"], f"{r['measured_peak_mb']:.0f}", f"{r['plan_peak_mb']:.0f}",
            f"{r['measured_peak_mb'] / r['plan_peak_mb']:.2f}", f"{r['step_s']:.2f}", f"{r['rollout_s']:.2f}",
            f"{r['update_s']:.2f}", f"{r['tokens_per_s']:.0f}",
        ))
    return format_table(header, rows)


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
    p.add_argument("--budget", type=float, default=None, help="seconds for all sizes; sizes left when it runs out are skipped")
    p.add_argument("--out", default=None, help=f"folder for {RESULT_NAME}.json and .txt")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one size in a fresh process
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, measure_size)
    sizes = parse_list(p, "--sizes", args.sizes, list(SIZES))
    settings = {
        "tokenizer": default_tokenizer(args.tokenizer), "batch_size": args.batch_size,
        "minibatch_size": args.minibatch_size, "ppo_epochs": args.ppo_epochs, "prompt_length": args.prompt_length,
        "response_length": args.response_length, "lora_r": args.lora_r, "steps": args.steps,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
    }
    jobs = [{**settings, "size": size} for size in sizes]
    results = run_jobs(Path(__file__).resolve(), jobs, args.timeout, args.budget, "ppo bench")
    title = (
        f"PPO with LoRA r{args.lora_r}, batch {args.batch_size}, minibatch {args.minibatch_size}, "
        f"{args.ppo_epochs} PPO epoch(s), prompt {args.prompt_length} + response {args.response_length}; "
        "measured peak vs plan.estimate"
    )
    report(args.out, RESULT_NAME, title, table(results), {"settings": settings, "results": results})
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
