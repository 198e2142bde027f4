"""Step time of ``tandem align dpo`` against the raw TRL ``DPOTrainer`` with the same settings.

    .venv/bin/python bench/align_overhead.py [--model tiny|smollm2|FOLDER] [--steps 12] [--repeats 2] [--lora]

Both sides train the same model on the same built-in preference pairs with the same DPOConfig
values, in this process, one after the other (alternating order per repeat). Step time is the
median gap between consecutive per-step logs after the first two steps, so it covers
tandem's callbacks (metrics.jsonl, hacking watch, progress bar) but not start-up; start-up
(data checks, run folder, model load) is reported separately as end-to-end wall time.
A ratio near 1.0 means tandem adds little on top of TRL.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Records the wall time of each log (every step), where tandem's metrics.jsonl stamps its own."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.times.append(time.perf_counter())

    def step_time(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.times[1:])]  # skip the first (warm-up) step
        return statistics.median(gaps)


SETTINGS: dict[str, Any] = {"batch_size": 4, "max_length": 128, "learning_rate": 1e-4, "beta": 0.1, "threads": 1}


def model_folder(name: str) -> Path:
    if name == "tiny":
        from tandemlm.testing.tiny_models import tiny_model

        return tiny_model("llama")
    from tandemlm.align.model import base_folder

    return base_folder(name)


def run_tandem(folder: Path, steps: int, lora: bool, out: Path) -> tuple[float, float]:
    """(step time, end-to-end seconds) of tandem's run_dpo: the code path of `tandem align dpo`."""
    from tandemlm.align.config import build_config
    from tandemlm.align.dpo import DPORunConfig, run_dpo
    from tandemlm.align.metrics import read_metrics

    values = {**SETTINGS, "model": str(folder), "dataset": "builtin:prefs_train", "max_steps": steps, "lora": lora,
              "save_steps": 10_000, "output_dir": str(out), "lr_scheduler": "constant", "logging_steps": 1}
    started = time.perf_counter()
    run = run_dpo(build_config(DPORunConfig, overrides=values))
    elapsed = time.perf_counter() - started
    times = [r["time"] for r in read_metrics(run.metrics) if "loss" in r]  # stamped at each step's log
    return statistics.median(b - a for a, b in itertools.pairwise(times[1:])), elapsed


def run_raw_trl(folder: Path, steps: int, lora: bool, out: Path) -> tuple[float, float]:
    """(step time, end-to-end seconds) of DPOTrainer configured by hand with the same values."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tandemlm.align.tasks import DATA_DIR

    started = time.perf_counter()
    torch.set_num_threads(SETTINGS["threads"])
    data = load_dataset("json", data_files=str(DATA_DIR / "prefs_train.jsonl"), split="train").remove_columns(["kind"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=SETTINGS["batch_size"],
        learning_rate=SETTINGS["learning_rate"], lr_scheduler_type="constant", beta=SETTINGS["beta"],
        max_length=SETTINGS["max_length"], gradient_checkpointing=False, bf16=False, use_cpu=True,
        save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
    )
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft, callbacks=[clock])
    trainer.train()
    return clock.step_time(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (the test fixture), smollm2, or an HF folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (reference = adapter disabled)")
    args = parser.parse_args()
    folder = model_folder(args.model)
    results: dict[str, list[tuple[float, float]]] = {"tandem": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ["tandem", "trl"] if repeat % 2 == 0 else ["trl", "tandem"]
            for side in order:
                out = Path(tmp) / f"{side}-{repeat}"
                runner = run_tandem if side == "tandem" else run_raw_trl
                results[side].append(runner(folder, args.steps, args.lora, out))
                print(f"repeat {repeat} {side}: step {results[side][-1][0]:.3f} s, end-to-end {results[side][-1][1]:.1f} s", flush=True)
    step = {side: statistics.median(r[0] for r in runs) for side, runs in results.items()}
    total = {side: statistics.median(r[1] for r in runs) for side, runs in results.items()}
    print(f"\nmodel {args.model}, {args.steps} steps, batch {SETTINGS['batch_size']}, lora={args.lora}")
    print(f"step time  tandem {step['tandem']:.3f} s  trl {step['trl']:.3f} s  ratio {step['tandem'] / step['trl']:.3f}")
    print(f"end-to-end tandem {total['tandem']:.1f} s  trl {total['trl']:.1f} s  ratio {total['tandem'] / total['trl']:.3f}")


if __name__ == "__main__":
    main()
