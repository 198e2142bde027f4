"""TRL 1.12 PPO on a local HF model: seconds per sample for rollout and update, and peak memory, as ONE JSON line.

Runs in its own venv (``.venv-trl112``, made by ``scripts/make_trl112_venv.sh``), never in tandemlm's: TRL 1.16 has
no PPO and 1.12.0 is the last release with ``trl.experimental.ppo``. Nothing here imports tandemlm. ``bench/ppo_step.py``
launches it and compares the numbers with our trainer's.

    .venv-trl112/bin/python bench/ppo_trl_baseline.py --model DIR --batch-size 4 --prompt-length 32 \\
        --response-length 16 --steps 4 [--lora]

What it builds, as TRL's PPOTrainer wants: policy = AutoModelForCausalLM(DIR) (with ``--lora`` TRL wraps it in a
PEFT LoRA adapter and the reference is the same model with the adapter disabled; without, the reference is a second
AutoModelForCausalLM), value model and reward model = AutoModelForSequenceClassification(DIR, num_labels=1) (random
score heads: the reward is noise, which is fine for timing). Note that TRL trains the value model in full even with
``--lora``: only the policy gets an adapter. Prompts are the user turns of ``tandemlm/data/capitals_train.jsonl``
rendered with the tokenizer's chat template, cut from the left (the assistant header stays) and left-padded to
exactly ``--prompt-length`` tokens. The pad token is ``<|endoftext|>``-like (``--pad-token``), not EOS: TRL builds
its attention masks as ``ids != pad_token_id``, so a pad equal to EOS would mask every end-of-turn token in the prompt.

How the time is split. ``PPOTrainer.train`` is one loop; each PPO step (one "update" in TRL's words) is:
data -> ``batch_generation`` (sampling) -> no-grad scoring (logprobs from the sampler's scores, reference logprobs,
values, rewards) and GAE -> ``num_ppo_epochs`` x minibatches of grad forward/backward/optimizer step -> metrics and
``self.log``. We wrap the module-level ``batch_generation`` and ``forward`` of ``trl.experimental.ppo.ppo_trainer``
and override ``log``: the rollout runs from entering ``batch_generation`` to the first ``forward`` called with grad
enabled (sampling + scoring + advantages); the update runs from there to ``log`` (all PPO epochs and optimizer
steps, plus the few no-grad metric reductions before ``log``). Per sample = summed seconds / (steps x batch size).
TRL's own ``eps`` metric (episodes per second since training began) covers both phases and start-up; it is reported
as ``trl_eps`` for reference. The first step is included (``--warmup N`` leaves N steps out of the timing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

DATA = Path(__file__).resolve().parents[1] / "tandemlm" / "data" / "capitals_train.jsonl"


class PhaseClock:
    """Start/stop marks of the rollout and update phases of each PPO step."""

    def __init__(self) -> None:
        self.rollout: list[float] = []
        self.update: list[float] = []
        self.metrics: list[dict[str, float]] = []
        self._rollout_start: float | None = None
        self._update_start: float | None = None

    def generation_begins(self) -> None:
        if self._rollout_start is None and self._update_start is None:
            self._rollout_start = time.perf_counter()

    def grad_forward(self) -> None:
        if self._rollout_start is not None:
            now = time.perf_counter()
            self.rollout.append(now - self._rollout_start)
            self._rollout_start, self._update_start = None, now

    def step_logged(self, metrics: dict[str, float]) -> None:
        if self._update_start is not None:
            self.update.append(time.perf_counter() - self._update_start)
            self._update_start = None
        self.metrics.append(dict(metrics))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="HF model folder (policy, reference, value and reward all start from it)")
    p.add_argument("--batch-size", type=int, default=4, help="rollout batch: sequences generated per PPO step")
    p.add_argument("--minibatch-size", type=int, default=0, help="sequences per forward/backward (0 = batch size)")
    p.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per sequence (exact)")
    p.add_argument("--response-length", type=int, default=16, help="tokens sampled per sequence")
    p.add_argument("--steps", type=int, default=4, help="PPO steps (rollout + update) to run")
    p.add_argument("--warmup", type=int, default=0, help="leading steps left out of the timing (still run)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch in the update")
    p.add_argument("--lora", action="store_true", help="LoRA adapter on the policy (TRL's peft_config)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DATA), help="JSONL with chat 'prompt' lists")
    p.add_argument("--pad-token", default="<|endoftext|>", help="pad token to use if it is in the vocabulary")
    args = p.parse_args(argv)
    args.minibatch_size = args.minibatch_size or args.batch_size
    if args.batch_size % args.minibatch_size:
        p.error("--batch-size must be a multiple of --minibatch-size")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def fixed_length_prompts(tokenizer: Any, data: Path, length: int) -> list[list[int]]:
    """Chat-templated prompts as token ids of exactly ``length``: cut from the left, left-padded."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    prompts: list[list[int]] = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)[-length:]
        prompts.append([tokenizer.pad_token_id] * (length - len(ids)) + ids)
    return prompts


def build(args: argparse.Namespace, output_dir: str) -> tuple[Any, PhaseClock]:
    """The PPOTrainer with its models and data, and the clock wired into it."""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    clock = PhaseClock()
    original_generation, original_forward = ppo_module.batch_generation, ppo_module.forward

    def timed_generation(*a: Any, **kw: Any) -> Any:
        clock.generation_begins()
        return original_generation(*a, **kw)

    def timed_forward(*a: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():
            clock.grad_forward()
        return original_forward(*a, **kw)

    ppo_module.batch_generation, ppo_module.forward = timed_generation, timed_forward

    class TimedPPOTrainer(PPOTrainer):
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # quiet: no callbacks
            clock.step_logged(logs)

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.pad_token and args.pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = args.pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    ref = None if args.lora else AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=dtype)
    for model in (policy, ref, value, reward):
        if model is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.pad_token_id = tokenizer.pad_token_id

    prompts = fixed_length_prompts(tokenizer, Path(args.data), args.prompt_length)
    dataset = Dataset.from_dict({"input_ids": prompts})
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    config = PPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.minibatch_size,
        gradient_accumulation_steps=args.batch_size // args.minibatch_size,
        num_mini_batches=1,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.steps * args.batch_size,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.response_length,
        num_sample_generations=0,
        learning_rate=1e-5,
        seed=args.seed,
        bf16=args.bf16,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = TimedPPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        eval_dataset=dataset.select(range(args.batch_size)),
        peft_config=peft_config,
    )
    return trainer, clock


def main(argv: list[str] | None = None) -> int:
    """Runs the steps and prints the JSON line on stdout (everything else goes to stderr)."""
    args = parse_args(argv)
    stdout = sys.stdout
    import warnings

    warnings.filterwarnings("ignore")
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="ppo-trl-") as out:
        import torch
        import transformers
        import trl

        if args.threads:
            torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        with contextlib.suppress(ImportError):
            import datasets

            datasets.disable_progress_bars()
        trainer, clock = build(args, out)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    timed = slice(args.warmup, None)
    rollout, update = sum(clock.rollout[timed]), sum(clock.update[timed])
    samples = (args.steps - args.warmup) * args.batch_size
    last = clock.metrics[-1] if clock.metrics else {}
    result = {
        "rollout_s_per_sample": round(rollout / samples, 5),
        "update_s_per_sample": round(update / samples, 5),
        "seconds_per_sample": round((rollout + update) / samples, 5),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_peak_mb": round(cuda_peak, 1) if cuda_peak is not None else None,
        "samples": samples,
        "trl_version": trl.__version__,
        "steps_timed": len(clock.rollout[timed]),
        "batch_size": args.batch_size,
        "minibatch_size": args.minibatch_size,
        "prompt_length": args.prompt_length,
        "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs,
        "lora": args.lora,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "rollout_s_per_step": [round(t, 4) for t in clock.rollout],
        "update_s_per_step": [round(t, 4) for t in clock.update],
        "trl_eps": last.get("eps"),
        "eos_tokens_last_step": last.get("val/num_eos_tokens"),
    }
    print(json.dumps(result), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
