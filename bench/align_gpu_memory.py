"""DPO and GRPO steps with LoRA on random-initialised DeepSeek-R1-Distill-Qwen-class models: measured peak memory
(beside the ``--plan`` estimate for GRPO) and seconds per step.

    python bench/align_gpu_memory.py [--methods dpo,grpo] [--sizes 0.5b,1.5b,7b] [--tokenizer FOLDER] [--out DIR]
    python bench/align_gpu_memory.py --sizes tiny-64 --steps 2 --batch-size 2 --grpo-batch-size 2 \\
        --num-generations 2 --prompt-length 16 --completion-length 8 --generation-length 8

Each method at each size runs in a fresh process (its own peak; an out-of-memory job does not stop the others), in
the order size by size, DPO then GRPO, so a budget that runs out cuts the largest sizes. The model is built from a
Qwen2 config with random weights directly on the device (``_gpu_bench.py``: bf16 on a GPU, fp32 on CPU), with LoRA
on all linear layers, and on a GPU bf16 and gradient checkpointing (``resolve_auto``'s one-GPU defaults).

DPO is TRL's ``DPOTrainer``, built by ``dpo.dpo_trainer`` from a ``DPORunConfig`` (the code path of ``tandem align
dpo`` after its data and weights load). It trains on pairs of random words: a prompt of about ``--prompt-length``
tokens and chosen and rejected answers of about ``--completion-length`` (``max_length`` is their sum); the reference
is the policy with its adapter off. It needs ``trl`` and ``datasets``; without them its rows say so and GRPO still runs.

GRPO is tandem's own RL trainer, as ``tandem align grpo`` trains: ``GroupTrainer`` with a ``GRPORunConfig`` on
``actor_critic_from_model`` and ``build_sampler`` (``_gpu_bench.measure_rl``, the PPO bench's code path without the
critic). ``--grpo-batch-size`` counts completions per step (the config's ``batch_size``), ``--num-generations`` per
prompt, so batch / group prompts of exactly ``--prompt-length`` random token ids are drawn per step; each completion
runs ``--generation-length`` tokens (random weights rarely stop early: the plan's worst case). The reward is tandem's
verifier (an arithmetic task random weights fail: 0) plus a scripted score of the text (distinct-character share),
no reward model; ``beta`` keeps the k3 KL to the reference in the loss as in runs, and the loss column is what was
backpropagated (policy loss + beta x KL) on the last step.

Measured is the RL trainer's ``peak_memory_mb``: ``torch.cuda.max_memory_allocated`` on a GPU since the trainer was
built, the process's peak RSS on CPU. The GRPO plan is ``plan.estimate(plan.inputs_from_config(config, run))`` for
the same run settings (no critic: the config's ``has_critic``); tandem has no memory plan for DPO, so its rows say
"no plan". Seconds per step leave out the first step (kernel warm-up). Results go to ``--out`` as
``align_gpu_memory.json`` and ``align_gpu_memory.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _gpu_bench import (
    SIZES,
    default_tokenizer,
    device_name,
    failed,
    format_table,
    measure_rl,
    measured_kind,
    not_run_row,
    params_label,
    parse_list,
    qwen2_config,
    random_model,
    report,
    reset_peak,
    run_jobs,
    run_worker,
)

RESULT_NAME = "align_gpu_memory"
METHODS = ("dpo", "grpo")
NO_PLAN = "no plan"  # tandem's memory plan (ppo/plan.py) covers its RL trainer, not TRL's DPO: nothing is invented
PLAN = "plan.estimate"
TRL_NEEDS = ("trl", "datasets")  # what DPO (TRL's trainer) needs; GRPO runs on tandem's own trainer


# ---------------------------------------------------------------------------------------------
# The worker: one method at one size


def run_config(job: dict[str, Any], cuda: bool) -> Any:
    """The method's run config as ``tandem align`` would resolve it on this machine, with LoRA also on CPU."""
    common: dict[str, Any] = {
        "model": "random-init", "dataset": "random-words", "lora": True, "lora_r": job["lora_r"], "lora_dropout": 0.0,
        "bf16": cuda, "gradient_checkpointing": cuda and job["gradient_checkpointing"], "max_steps": job["steps"],
        "lr_scheduler": "constant", "save_steps": job["steps"] + 1, "logging_steps": 1, "seed": 0,
        "threads": 0 if cuda else 1,  # one CPU thread: two spin-wait on each other on a shared 2-core machine
    }
    if job["method"] == "dpo":
        from tandemlm.align.dpo import DPORunConfig

        return DPORunConfig(**common, batch_size=job["batch_size"],
                            max_length=job["prompt_length"] + job["completion_length"])
    from tandemlm.align.ppo.group_config import GRPORunConfig

    return GRPORunConfig(
        **common, batch_size=job["grpo_batch_size"], num_generations=job["num_generations"],
        max_completion_length=job["generation_length"], max_length=job["prompt_length"] + job["generation_length"],
        rewards="verifier",  # plus the scripted score measure_rl adds
        # Random weights in bf16: the cache-vs-forward gap is reported (rollout_logprob_diff), not judged here.
        logprob_tolerance=10.0,
    )


def word_list(tokenizer: Any) -> list[str]:
    """The vocabulary's whole-word entries (`` word``, 3-8 ASCII letters): each re-tokenizes to one token."""
    return [t.replace("Ġ", " ") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
            if t and t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha() and 4 <= len(t) <= 9]


def preference_pairs(job: dict[str, Any], tokenizer: Any, rows: int) -> Any:
    """``rows`` random-word preference pairs for DPO (prompt, chosen, rejected)."""
    from datasets import Dataset

    words, rng = word_list(tokenizer), random.Random(0)

    def text(tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(tokens))

    # TRL appends EOS to chosen and rejected
    pairs = [{"prompt": text(job["prompt_length"]), "chosen": text(job["completion_length"] - 1),
              "rejected": text(job["completion_length"] - 1)} for _ in range(rows)]
    return Dataset.from_list(pairs)


def step_clock() -> Any:
    """A trainer callback timing each optimizer step (the GPU synchronised at both ends) in ``.seconds``."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.started = 0.0

        def now(self) -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = self.now()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds.append(self.now() - self.started)

    return StepClock()


def build_dpo_trainer(job: dict[str, Any], folder: Path) -> tuple[Any, int]:
    """TRL's DPO trainer as tandem builds it, on a random model of ``job["size"]``, and the model's parameter count."""
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tandemlm.align.dpo import dpo_trainer
    from tandemlm.align.model import load_tokenizer, lora_config, set_threads
    from tandemlm.align.prepare import Prepared, quiet_libraries
    from tandemlm.align.run import Run

    quiet_libraries()
    config = run_config(job, torch.cuda.is_available())
    set_threads(config.threads)
    tokenizer = load_tokenizer(job["tokenizer"])
    torch.manual_seed(config.seed)
    model = random_model(qwen2_config(job["size"]), bool(config.bf16))
    params = sum(p.numel() for p in model.parameters())
    rows = preference_pairs(job, tokenizer, config.batch_size * job["steps"])
    trainer = dpo_trainer(Prepared(Run(folder, config), model, tokenizer, rows, None, lora_config(config, model)))
    for callback in (PrinterCallback, ProgressCallback):  # their log lines would only fill the worker's stdout
        trainer.remove_callback(callback)
    return trainer, params


def measure_dpo(job: dict[str, Any]) -> dict[str, Any]:
    """Builds TRL's DPO trainer, runs ``steps`` steps; returns peak memory, seconds per step and the logged loss."""
    from tandemlm.align.ppo.rl_trainer import peak_memory_mb

    with tempfile.TemporaryDirectory(prefix="align-gpu-bench-") as folder:
        started = time.monotonic()
        trainer, params = build_dpo_trainer(job, Path(folder))
        built = time.monotonic() - started
        clock = step_clock()
        trainer.add_callback(clock)
        reset_peak()
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    timed = clock.seconds[1:] or clock.seconds
    args = trainer.args
    return {
        "device": device_name(), "dtype": "bf16" if args.bf16 else "fp32",
        "gradient_checkpointing": bool(args.gradient_checkpointing), "params": params,
        "measured_peak_mb": peak_memory_mb(), "measured": measured_kind(), "plan_peak_mb": None, "plan": NO_PLAN,
        "build_s": built, "first_step_s": clock.seconds[0], "step_s": sum(timed) / len(timed),
        "loss": logs[-1]["loss"] if logs else None, "mean_completion_length": None, "steps": len(clock.seconds),
    }


def measure_grpo(job: dict[str, Any]) -> dict[str, Any]:
    """Runs ``steps`` steps of tandem's GRPO (``GroupTrainer``); returns measured and planned memory and times."""
    import torch

    from tandemlm.align.ppo.group_trainer import GroupTrainer
    from tandemlm.align.prepare import quiet_libraries

    quiet_libraries()
    c = run_config(job, torch.cuda.is_available())
    result, steps = measure_rl(job, c, GroupTrainer, verifier=True)
    last = steps[-1]
    # What _actor_step backpropagated: the policy loss, the entropy bonus and beta times the k3 KL.
    loss = last["policy_loss"] - c.entropy_coef * last["entropy"] + c.beta * last.get("kl_loss", 0.0)
    return {**result, "plan": PLAN, "loss": loss, "mean_completion_length": result["mean_response_length"]}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One job: DPO on TRL's trainer, GRPO on tandem's."""
    return measure_dpo(job) if job["method"] == "dpo" else measure_grpo(job)


# ---------------------------------------------------------------------------------------------
# The table and the command line


def table(results: list[dict[str, Any]]) -> str:
    """One row per method and size: measured peak, the plan (GRPO's; none for DPO), seconds per step."""
    header = ("method", "size", "params", "dtype", "measured MiB", "plan MiB", "measured/plan", "s/step",
              "first step s", "loss")
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append(not_run_row(r, (r["method"], r["size"]), len(header)))
            continue
        planned = r["plan_peak_mb"]
        rows.append((
            r["method"], r["size"], params_label(r["params"]), r["dtype"], f"{r['measured_peak_mb']:.0f}",
            NO_PLAN if planned is None else f"{planned:.0f}", "-" if planned is None else f"{r['measured_peak_mb'] / planned:.2f}",
            f"{r['step_s']:.2f}", f"{r['first_step_s']:.2f}", "-" if r["loss"] is None else f"{r['loss']:.4f}",
        ))
    return format_table(header, rows)


def parser() -> argparse.ArgumentParser:
    """The command line; the defaults are tandem's method defaults (batch sizes, group size) on the GPU sizes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--sizes", default="0.5b,1.5b,7b", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the tiny Qwen2 fixture's, R1-Distill's)")
    p.add_argument("--batch-size", type=int, default=4, help="DPO preference pairs per step")
    p.add_argument("--grpo-batch-size", type=int, default=8, help="GRPO completions per step")
    p.add_argument("--num-generations", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--prompt-length", type=int, default=256, help="about this many prompt tokens")
    p.add_argument("--completion-length", type=int, default=256, help="DPO chosen/rejected tokens")
    p.add_argument("--generation-length", type=int, default=64, help="GRPO max_completion_length")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="on a GPU it is on by default, as in runs")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per method and size")
    p.add_argument("--budget", type=float, default=None, help="seconds for all jobs; jobs left when it runs out are skipped")
    p.add_argument("--out", default=None, help=f"folder for {RESULT_NAME}.json and .txt")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one job in a fresh process
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs every method at every size, prints and writes the table and JSON; exit 1 when a job failed."""
    p = parser()
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, measure)
    methods = parse_list(p, "--methods", args.methods, METHODS)
    sizes = parse_list(p, "--sizes", args.sizes, list(SIZES))
    settings = {
        "tokenizer": default_tokenizer(args.tokenizer), "batch_size": args.batch_size,
        "grpo_batch_size": args.grpo_batch_size, "num_generations": args.num_generations,
        "prompt_length": args.prompt_length, "completion_length": args.completion_length,
        "generation_length": args.generation_length, "lora_r": args.lora_r, "steps": args.steps,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
    }
    jobs = [{**settings, "method": m, "size": s} for s in sizes for m in methods]
    missing = [name for name in TRL_NEEDS if importlib.util.find_spec(name) is None]
    # The GPU image has neither unless the carried wheels went in: DPO's rows say so without a failed start each;
    # GRPO runs on tandem's own trainer either way. The rest keep their order (and the budget) as they run.
    blocked = f"{' and '.join(missing)} not installed (DPO is TRL's trainer)" if missing else None
    runnable = [j for j in jobs if not (blocked and j["method"] == "dpo")]
    ran = iter(run_jobs(Path(__file__).resolve(), runnable, args.timeout, args.budget, "align bench"))
    results = [next(ran) if j in runnable else {"method": j["method"], "size": j["size"], "error": blocked} for j in jobs]
    title = (
        f"DPO (batch {args.batch_size} pairs, prompt {args.prompt_length} + completion {args.completion_length}; "
        f"TRL's trainer as tandem configures it, {NO_PLAN}) and GRPO (batch {args.grpo_batch_size} completions, "
        f"group {args.num_generations}, prompt {args.prompt_length} + generation {args.generation_length}; tandem's "
        f"GroupTrainer, measured peak vs {PLAN}) with LoRA r{args.lora_r}"
    )
    report(args.out, RESULT_NAME, title, table(results), {"settings": settings, "results": results})
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
