"""Our PPO step against TRL 1.12's ``PPOTrainer``: seconds per sample (rollout, update) and peak memory, with the
memory plan's estimate beside them.

    .venv/bin/python bench/ppo_step.py [--model FOLDER] [--batch-size 4] [--prompt-length 32] \\
        [--response-length 16] [--steps 4] [--lora] [--ppo-epochs 1] [--threads 1] [--json]

Both sides run the same HF folder (default: the tiny Llama fixture), the same prompts (the built-in capitals
prompts through the chat template, exactly ``--prompt-length`` tokens: see ``fixed_length_prompts`` in
``bench/ppo_trl_baseline.py``), the same rollout batch, response length, PPO epochs and torch threads, each in a
fresh process so peak memory is its own (RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU). The table shows
ours / TRL: below 1.0 is faster or smaller than TRL. Keep ``--threads`` at 1 on a shared 2-core machine: with 2
threads the same TRL step took 3x longer and varied by 40% run to run.

TRL's side runs in its own venv, ``.venv-trl112`` (TRL 1.12.0 is the last release with PPO; never a dependency of
ours). Build it once with ``bash scripts/make_trl112_venv.sh``, which runs::

    python3 -m venv .venv-trl112
    .venv-trl112/bin/python -m pip install torch==2.13.0          # the CPU build, first
    .venv-trl112/bin/python -m pip install trl==1.12.0 transformers==5.19.0 peft==0.21.2 accelerate==1.15.0 \\
        datasets==5.2.0

Differences to keep in mind when reading the ratios: TRL's PPO trains the value model in full even with ``--lora``
(only the policy gets an adapter) and keeps separate reward and value models (4 model copies without LoRA, 3
with); ours keeps one base with actor and critic adapters. TRL backpropagates policy and value losses together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / ".venv-trl112"
BASELINE_SCRIPT = REPO / "bench" / "ppo_trl_baseline.py"
MAKE_VENV = "bash scripts/make_trl112_venv.sh"
# Keys both sides report (ours must return them too).
RESULT_KEYS = (
    "rollout_s_per_sample",
    "update_s_per_sample",
    "seconds_per_sample",
    "peak_rss_mb",
    "cuda_peak_mb",
    "samples",
)


class BaselineUnavailable(RuntimeError):
    """The TRL 1.12 venv is missing or its run failed."""


def trl_python() -> Path:
    """The TRL venv's python, or BaselineUnavailable saying how to build the venv."""
    python = TRL_VENV / "bin" / "python"
    if not python.is_file():
        raise BaselineUnavailable(
            f"the TRL 1.12 baseline venv is missing ({TRL_VENV}); build it with `{MAKE_VENV}` "
            "(python3 -m venv .venv-trl112, then pip install torch==2.13.0 first, then trl==1.12.0 "
            "transformers==5.19.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0)"
        )
    return python


def run_trl_baseline(
    model_dir: str | Path,
    batch_size: int,
    prompt_length: int,
    response_length: int,
    steps: int,
    lora: bool,
    *,
    minibatch_size: int | None = None,
    ppo_epochs: int = 1,
    threads: int = 1,
    seed: int = 0,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Runs ``bench/ppo_trl_baseline.py`` in ``.venv-trl112`` and returns its JSON result (see that script)."""
    command = [
        str(trl_python()), str(BASELINE_SCRIPT), "--model", str(model_dir), "--batch-size", str(batch_size),
        "--minibatch-size", str(minibatch_size or batch_size), "--prompt-length", str(prompt_length),
        "--response-length", str(response_length), "--steps", str(steps), "--ppo-epochs", str(ppo_epochs),
        "--threads", str(threads), "--seed", str(seed),
    ]
    if lora:
        command.append("--lora")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BaselineUnavailable(f"the TRL baseline ran past {timeout:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BaselineUnavailable(f"the TRL baseline failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


# ---- ours ------------------------------------------------------------------------------------------------------------


def run_ours(
    model_dir: str | Path,
    batch_size: int,
    prompt_length: int,
    response_length: int,
    steps: int,
    lora: bool,
    *,
    minibatch_size: int | None = None,
    ppo_epochs: int = 1,
    threads: int = 1,
    seed: int = 0,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Our PPO step, measured like :func:`run_trl_baseline` (same arguments), in a fresh process of this venv.

    The worker (:func:`ours_worker`) drives ``PPOTrainer`` directly on the prompts of
    ``ppo_trl_baseline.fixed_length_prompts`` (exactly ``prompt_length`` tokens) with a reward model loaded from
    the same folder (a separate copy, as TRL's), and times the rollout (sampling, scoring, advantages) apart from
    the update (all PPO epochs and optimizer steps): the split TRL's side uses.
    """
    settings = {
        "model_dir": str(model_dir), "batch_size": batch_size, "prompt_length": prompt_length,
        "response_length": response_length, "steps": steps, "lora": lora, "minibatch_size": minibatch_size or batch_size,
        "ppo_epochs": ppo_epochs, "threads": threads, "seed": seed,
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--ours-worker", json.dumps(settings)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"our PPO step failed (exit {done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-15:]))
    return json.loads(lines[-1])


def ours_worker(settings: dict[str, Any]) -> dict[str, Any]:
    """Runs ``steps`` PPO steps in this process and returns the measurements (see :func:`run_ours`)."""
    import resource
    import sys as _sys

    import torch

    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.ppo.config import PPORunConfig
    from tandemlm.align.ppo.method import build_actor_critic, build_sampler
    from tandemlm.align.ppo.scoring import RewardMix, SeparateRewardModel
    from tandemlm.align.ppo.trainer import Distributed, PPOTrainer
    from tandemlm.align.tasks import DATA_DIR

    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ppo_trl_baseline import fixed_length_prompts

    s = settings
    torch.set_num_threads(s["threads"])
    folder = Path(s["model_dir"])
    config = PPORunConfig(
        model=str(folder), dataset="builtin:capitals_train", lora=s["lora"], batch_size=s["batch_size"],
        minibatch_size=s["minibatch_size"], ppo_epochs=s["ppo_epochs"], max_completion_length=s["response_length"],
        max_length=s["prompt_length"] + s["response_length"], seed=s["seed"], gradient_checkpointing=False, bf16=False,
        rewards="reward_model", reward_model=str(folder), lr_scheduler="constant",
    )
    tokenizer = load_tokenizer(folder)
    data = DATA_DIR / "capitals_train.jsonl"
    prompt_ids = [[t for t in ids if t != tokenizer.pad_token_id] for ids in fixed_length_prompts(tokenizer, data, s["prompt_length"])]
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    torch.manual_seed(s["seed"])
    ac = build_actor_critic(config, folder)
    reward = RewardMix([("reward_model", 1.0, SeparateRewardModel(folder, torch.float32))])
    trainer = PPOTrainer(
        config, ac, tokenizer, rows, prompt_ids, reward, Distributed(), s["steps"],
        build_sampler(config, ac, tokenizer, folder),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    per_step = [trainer.train_step() for _ in range(s["steps"])]
    samples = s["batch_size"] * s["steps"]
    rollout, update = sum(p["rollout_s"] for p in per_step), sum(p["update_s"] for p in per_step)
    return {
        "rollout_s_per_sample": rollout / samples, "update_s_per_sample": update / samples,
        "seconds_per_sample": (rollout + update) / samples,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "samples": samples, "mean_response_length": sum(p["completions/mean_length"] for p in per_step) / len(per_step),
    }


# ---- the plan, the table -----------------------------------------------------------------------------------------


def plan_estimate(
    model_dir: str | Path, batch_size: int, prompt_length: int, response_length: int, lora: bool,
    *, minibatch_size: int | None = None, dtype_bytes: int = 4, gradient_checkpointing: bool = False,
) -> dict[str, float]:
    """The memory plan's peak and phases in MiB for these settings (CPU defaults: fp32, no checkpointing)."""
    from tandemlm.align.ppo.plan import MIB, estimate, inputs_from_config

    config = json.loads((Path(model_dir) / "config.json").read_text())
    plan = estimate(inputs_from_config(
        config, lora=lora, batch_size=batch_size, minibatch_size=minibatch_size or batch_size,
        prompt_length=prompt_length, response_length=response_length, dtype_bytes=dtype_bytes,
        gradient_checkpointing=gradient_checkpointing,
    ))
    return {"peak_mb": plan.total / MIB, "rollout_mb": plan.rollout_phase / MIB, "update_mb": plan.update_phase / MIB}


def comparison_rows(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(measure, ours, TRL, ours/TRL) rows; a missing side shows as '-'."""
    rows = []
    for key, label, unit in (
        ("rollout_s_per_sample", "rollout", "s/sample"),
        ("update_s_per_sample", "update", "s/sample"),
        ("seconds_per_sample", "rollout + update", "s/sample"),
        ("peak_rss_mb", "peak RSS", "MiB"),
        ("cuda_peak_mb", "CUDA peak", "MiB"),
    ):
        a = ours.get(key) if ours else None
        b = theirs.get(key) if theirs else None
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        rows.append((f"{label} ({unit})", _num(a), _num(b), ratio))
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 10 else f"{value:.0f}"


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    """Plain-text table with a header."""
    header = ("measure", "ours", "TRL 1.12", "ours/TRL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs both sides (each it can) and prints the table; exit 1 when neither ran."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF folder (default: the tiny Llama fixture)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--minibatch-size", type=int, default=0, help="0 = the batch size")
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--json", action="store_true", help="print both raw results as one JSON line too")
    p.add_argument("--ours-worker", default=None, help=argparse.SUPPRESS)  # internal: one side in a fresh process
    args = p.parse_args(argv)
    if args.ours_worker:
        print(json.dumps(ours_worker(json.loads(args.ours_worker))))
        return 0
    if args.model is None:
        from tandemlm.testing.tiny_models import tiny_model

        args.model = str(tiny_model("llama"))
    common: dict[str, Any] = {
        "model_dir": args.model, "batch_size": args.batch_size, "prompt_length": args.prompt_length,
        "response_length": args.response_length, "steps": args.steps, "lora": args.lora,
        "minibatch_size": args.minibatch_size or None, "ppo_epochs": args.ppo_epochs, "threads": args.threads,
    }
    results: dict[str, dict[str, Any] | None] = {"ours": None, "trl": None}
    missing: list[str] = []
    for side, runner in (("ours", run_ours), ("trl", run_trl_baseline)):
        try:
            results[side] = runner(**common)
        except (RuntimeError, BaselineUnavailable) as exc:
            missing.append(f"{side}: not measured: {exc}")
    plan = plan_estimate(
        args.model, args.batch_size, args.prompt_length, args.response_length, args.lora,
        minibatch_size=args.minibatch_size or None,
    )
    print(
        f"model {args.model}\nbatch {args.batch_size}, prompt {args.prompt_length}, response {args.response_length}, "
        f"{args.steps} steps, {args.ppo_epochs} PPO epoch(s), lora={args.lora}, threads {args.threads}\n"
    )
    print(format_table(comparison_rows(results["ours"], results["trl"])))
    print(
        f"\nplan (ours, fp32, no checkpointing): peak {plan['peak_mb']:.0f} MiB "
        f"(rollout phase {plan['rollout_mb']:.0f}, update phase {plan['update_mb']:.0f})"
    )
    for line in missing:
        print(line)
    if args.json:
        print(json.dumps({**results, "plan": plan}))
    return 0 if any(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
