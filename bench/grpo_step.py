"""Our GRPO, DAPO and GSPO steps against TRL 1.16's ``GRPOTrainer``: seconds per generated sample (rollout, update)
and peak memory, ours / TRL per algorithm, from one run.

    .venv/bin/python bench/grpo_step.py [--algorithms grpo,dapo,gspo] [--model FOLDER] [--batch-size 16] \\
        [--num-generations 4] [--max-completion-length 24] [--lora-layers 8] [--steps 4] [--warmup 1] [--json]

Each (algorithm, side) runs in a fresh process of this venv (``--worker``), so its peak memory is its own: peak RSS
on CPU (our ``rl_trainer.peak_memory_mb``, ``resource.getrusage`` for TRL's), ``torch.cuda.max_memory_allocated``
on a GPU (reset once the models are built, on both sides). Both sides get, by construction:

- the model (default: the built-in SmolLM2-135M-Instruct HF folder, ``base_folder("smollm2")``), loaded in fp32
  (bf16 on both with ``--bf16``), dropout off, no gradient checkpointing, no vLLM, ``torch.set_num_threads(1)``;
- LoRA from ONE function: TRL's ``peft_config`` is ``tandemlm.align.model.lora_config`` of our config on TRL's own
  loaded model (r 16, alpha 32, dropout 0, the blocks' linear layers, ``layers_to_transform`` = the last
  ``--lora-layers``); the reference is the base with the adapter off on both sides;
- the built-in capitals prompts (``tandemlm/data/capitals_train.jsonl``) through the chat template: the same token ids
  (TRL renders them itself; checked equal for SmolLM2), drawn in a seeded shuffle of each side's own;
- ``--batch-size`` completions per step, ``--num-generations`` per prompt, ``--max-completion-length``, temperature 1,
  top-p 1, top-k off, the same stop ids; ONE optimizer step per generation batch (TRL: ``per_device_train_batch_size``
  = batch, ``gradient_accumulation_steps`` = ``steps_per_generation`` = ``num_iterations`` = 1; ours:
  ``minibatch_size`` = batch, ``num_iterations`` 1, ``grad_accum`` 1); AdamW (TRL: ``adamw_torch``, not its fused
  default), constant learning rate, gradient clip 1.0;
- a verifier-free reward both compute the same way: the share of distinct characters of the completion's text
  (``_gpu_bench.distinct_share``; ours through a custom ``RewardMix`` source, TRL's as a reward function).

The algorithm's knobs are read from OUR config class (``our_config``) and mapped onto ``GRPOConfig`` by
``trl_grpo_config`` (``tests/align/test_grpo_bench.py`` pins the mapping):

=========  ======================================================================================================
grpo       ``loss_type="grpo"`` (per-response token mean, then the mean), epsilon 0.2, ``beta=0.04`` with
           ``use_bias_correction_kl=False`` (TRL's default multiplies the k3 term by the ratio; the paper does not)
dapo       ``loss_type="dapo"`` (token mean of the generation batch), epsilon 0.2 / ``epsilon_high`` 0.28, beta 0;
           DAPO's soft overlong punishment on both: ours ``overlong_buffer`` (default a quarter of the completion
           length), TRL's ``trl.rewards.get_soft_overlong_punishment`` with the same cache as a second reward function
           of weight 1 (the same formula, DAPO eq. 13). TRL has no dynamic sampling: ours runs with it off
gspo       ``importance_sampling_level="sequence"``, ``loss_type="grpo"``, epsilon 3e-4 / 4e-4, beta 0
=========  ======================================================================================================

Timing: ``--warmup`` steps (not counted) then ``--steps`` steps. Ours: ``GroupTrainer.train_step``'s own split
(rollout = draw, sample, score, reference (and on step 1 the actor's) log-probs, advantages; update = the loss passes,
optimizer step, scheduler). TRL's: a callback marks ``on_step_begin`` / ``on_step_end`` of each optimizer step, and
``_generate_and_score_completions`` (sampling, decoding, rewards, reference log-probs when beta > 0, advantages) is
timed inside it; update = the step minus that (the loss forward/backward, clip, optimizer and scheduler steps).
Per sample = summed seconds / (steps x batch). The mean completion length is printed beside: it sets the cost of a
sample, and the two sides draw their own samples.

Where the sides still differ (read the ratios with these in mind):

- Ours computes the reference's log-probs every step, also with beta 0 (DAPO, GSPO), to log the KL; TRL skips the
  reference pass when beta is 0.
- With ``--lora-layers`` below the model's depth, ours runs the frozen lower layers once per rollout and starts
  the reference and update passes from the cached hidden states; TRL runs every layer in each pass (its backward
  stops at the first adapted layer too). ``--lora-layers 0`` puts adapters on every layer on both sides.
- Prompt order: each side shuffles with its own seeded sampler, so the steps see different (equally long on
  average) prompts. Advantage epsilon: TRL divides by std + 1e-4, ours by std + its own eps (no cost difference).
- TRL computes the entropy of every completion token in the update (logged); ours too (no gradient through it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _gpu_bench import distinct_share, parse_list  # bench/ is on sys.path when this runs as a script

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tandemlm" / "data" / "capitals_train.jsonl"
ALGORITHMS = ("grpo", "dapo", "gspo")
SIDES = ("ours", "trl")
RESULT_PREFIX = "grpo-bench-result: "
# The targets, printed beside the ratios (never asserted): time <= 1.0x TRL's, memory <= 0.6x.
TIME_TARGET, MEMORY_TARGET = 1.0, 0.6
# Our aggregations and policy losses that TRL 1.16 has a loss for (others are refused, never approximated).
TRL_LOSS_TYPES = {"seq-mean-token-mean": "grpo", "token-mean": "dapo"}
TRL_IS_LEVELS = {"token-clip": "token", "sequence": "sequence"}
DEFAULTS: dict[str, Any] = {
    "batch_size": 16, "num_generations": 4, "max_completion_length": 24, "max_length": 128, "lora_r": 16,
    "lora_alpha": 32, "lora_layers": 8, "learning_rate": 1e-6, "steps": 4, "warmup": 1, "threads": 1, "seed": 0,
    "bf16": False,
}


# ---- the two configurations ------------------------------------------------------------------------------------------


def our_config(algorithm: str, s: dict[str, Any]) -> Any:
    """Our ``GRPORunConfig`` / ``DAPORunConfig`` / ``GSPORunConfig`` for the bench settings ``s``.

    One optimizer step per rollout (minibatch = batch, one pass), LoRA, dropout and checkpointing off. DAPO's dynamic
    sampling is off (TRL has none); its overlong shaping stays at DAPO's default (TRL gets the same as a reward).
    ``rewards`` stays at its default: the worker passes the bench's own ``RewardMix``.
    """
    from tandemlm.align.ppo.group_config import DAPORunConfig, GRPORunConfig, GSPORunConfig

    classes = {"grpo": GRPORunConfig, "dapo": DAPORunConfig, "gspo": GSPORunConfig}
    if algorithm not in classes:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(classes)}")
    extra = {"dynamic_sampling": False} if algorithm == "dapo" else {}
    return classes[algorithm](
        model=str(s["model_dir"]), dataset="builtin:capitals_train", lora=True, lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"], lora_dropout=0.0, lora_layers=s["lora_layers"] or None,
        batch_size=s["batch_size"], minibatch_size=s["batch_size"], num_generations=s["num_generations"],
        num_iterations=1, grad_accum=1, max_completion_length=s["max_completion_length"], max_length=s["max_length"],
        temperature=1.0, top_k=0, learning_rate=s["learning_rate"], lr_scheduler="constant", warmup_steps=0,
        max_grad_norm=1.0, seed=s["seed"], gradient_checkpointing=False, bf16=bool(s["bf16"]), threads=s["threads"],
        max_steps=s["warmup"] + s["steps"], entropy_coef=0.0, **extra,
    )


def trl_grpo_kwargs(ours: Any, s: dict[str, Any], output_dir: str, cuda: bool) -> dict[str, Any]:
    """``GRPOConfig`` fields for the same algorithm and schedule as ``ours`` (a knob TRL cannot express raises)."""
    if ours.advantage != "group":
        raise ValueError(f"advantage {ours.advantage!r}: TRL 1.16 has group advantages only")
    aggregation = "seq-mean-token-mean" if ours.policy_loss.startswith("sequence") else ours.loss_aggregation
    if aggregation not in TRL_LOSS_TYPES or ours.policy_loss not in TRL_IS_LEVELS:
        raise ValueError(f"{ours.policy_loss} / {aggregation}: no TRL 1.16 loss_type computes this")
    if ours.dynamic_sampling:
        raise ValueError("dynamic_sampling: TRL 1.16 has none; turn it off for the comparison")
    return {
        "output_dir": output_dir,
        # One generation batch = one optimizer step = one loss over the whole batch.
        "per_device_train_batch_size": ours.batch_size, "gradient_accumulation_steps": 1, "steps_per_generation": 1,
        "num_generations": ours.num_generations, "num_iterations": ours.num_iterations,
        "max_completion_length": ours.max_completion_length, "temperature": ours.temperature, "top_p": 1.0,
        "top_k": ours.top_k, "repetition_penalty": 1.0,
        # The algorithm.
        "loss_type": TRL_LOSS_TYPES[aggregation], "importance_sampling_level": TRL_IS_LEVELS[ours.policy_loss],
        "epsilon": ours.cliprange, "epsilon_high": ours.upper_clip, "beta": ours.beta,
        "use_bias_correction_kl": False,  # plain beta * k3, as ours (TRL's default weighs it by the ratio)
        "scale_rewards": "group" if ours.advantage_scale == "std" else "none",
        "mask_truncated_completions": False, "top_entropy_quantile": 1.0, "entropy_coef": ours.entropy_coef,
        "delta": None, "off_policy_mask_threshold": None, "use_vllm": False,
        "reward_weights": [1.0, ours.overlong_penalty] if ours.overlong_tokens else [1.0],
        # The schedule and optimizer.
        "learning_rate": ours.learning_rate, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "max_grad_norm": ours.max_grad_norm, "optim": "adamw_torch", "weight_decay": 0.0,
        "max_steps": ours.max_steps, "seed": ours.seed, "bf16": bool(ours.bf16), "gradient_checkpointing": False,
        "disable_dropout": True, "use_cpu": not cuda,
        # Quiet, nothing written.
        "report_to": "none", "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "log_completions": False,
        "dataloader_num_workers": 0,
    }


def trl_grpo_config(ours: Any, s: dict[str, Any], output_dir: str, cuda: bool = False) -> Any:
    """TRL's ``GRPOConfig`` for ``ours`` (see :func:`trl_grpo_kwargs`)."""
    from trl import GRPOConfig

    return GRPOConfig(**trl_grpo_kwargs(ours, s, output_dir, cuda))


def completion_text(completion: Any) -> str:
    """A TRL completion's text: conversational ones are lists of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def distinct_chars_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """TRL's side of the bench's reward: ``distinct_share`` of each completion's text."""
    return distinct_share([completion_text(c) for c in completions])


def trl_reward_funcs(ours: Any) -> list[Any]:
    """The reward functions for TRL, matching ``trl_grpo_kwargs``'s ``reward_weights``: DAPO adds the overlong one."""
    funcs: list[Any] = [distinct_chars_reward]
    if ours.overlong_tokens:
        from trl.rewards import get_soft_overlong_punishment

        funcs.append(get_soft_overlong_punishment(ours.max_completion_length, ours.overlong_tokens))
    return funcs


# ---- the workers (one side of one algorithm, in a fresh process) -----------------------------------------------------


def _rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def _summary(rollout: list[float], update: list[float], batch: int, lengths: list[float]) -> dict[str, Any]:
    samples = batch * len(rollout)
    return {
        "rollout_s_per_sample": sum(rollout) / samples, "update_s_per_sample": sum(update) / samples,
        "seconds_per_sample": (sum(rollout) + sum(update)) / samples, "samples": samples,
        "rollout_s_per_step": [round(t, 4) for t in rollout], "update_s_per_step": [round(t, 4) for t in update],
        "mean_completion_length": sum(lengths) / len(lengths) if lengths else None,
    }


def ours_worker(s: dict[str, Any]) -> dict[str, Any]:
    """Our ``GroupTrainer`` for ``s["algorithm"]``: warm-up steps, then the timed ones; returns the measurements."""
    import torch

    torch.set_num_threads(s["threads"])
    from tandemlm.align.model import load_model, load_tokenizer
    from tandemlm.align.ppo.group_trainer import GroupTrainer
    from tandemlm.align.ppo.method import actor_critic_from_model, build_sampler
    from tandemlm.align.ppo.rl_trainer import Distributed, peak_memory_mb
    from tandemlm.align.ppo.rollout import tokenize_prompts
    from tandemlm.align.ppo.scoring import RewardMix

    c = our_config(s["algorithm"], s)
    folder = Path(s["model_dir"])
    cuda = torch.cuda.is_available()
    rows = _rows()
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenize_prompts(tokenizer, [r["prompt"] for r in rows])
    # method.build_actor_critic, plus the move to the GPU (load_model leaves a non-QLoRA model on the CPU).
    torch.manual_seed(c.seed)
    model = load_model(folder, c)
    if cuda:
        model.to("cuda")
    ac = actor_critic_from_model(c, model)
    reward = RewardMix([("distinct_chars", 1.0, lambda rows, texts: list(distinct_share(texts)))])
    torch.manual_seed(c.seed)
    trainer = GroupTrainer(c, ac, tokenizer, rows, prompt_ids, reward, Distributed(), c.max_steps,
                           build_sampler(c, ac, tokenizer, folder))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = [trainer.train_step() for _ in range(s["warmup"])]
    cpu_started = time.process_time()
    steps += [trainer.train_step() for _ in range(s["steps"])]
    cpu_seconds = time.process_time() - cpu_started
    timed = steps[s["warmup"]:]
    result = _summary([p["rollout_s"] for p in timed], [p["update_s"] for p in timed], c.batch_size,
                      [p["completions/mean_length"] for p in timed])
    return {
        **result, "cpu_s_per_sample": cpu_seconds / result["samples"], "peak_rss_mb": _peak_rss_mb(), "cuda_peak_mb": peak_memory_mb() if cuda else None,
        "trainable_params": sum(p.numel() for p in ac.actor_parameters()), "threads": torch.get_num_threads(),
        "mean_reward": sum(p["reward"] for p in timed) / len(timed),
    }


def trl_worker(s: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``GRPOTrainer`` configured as :func:`ours_worker`'s trainer; returns the same measurements."""
    import torch

    torch.set_num_threads(s["threads"])
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from tandemlm.align.model import lora_config

    transformers.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
    ours = our_config(s["algorithm"], s)
    cuda = torch.cuda.is_available()
    rollout: list[float] = []
    steps: list[float] = []
    lengths: list[float] = []
    rewards: list[float] = []
    started: list[float] = []
    cpu_steps: list[float] = []  # the process's CPU seconds per optimizer step (all its threads)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        """Each optimizer step's wall time; the logged mean completion length."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            started.append(time.perf_counter())
            cpu_steps.append(time.process_time())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            steps.append(time.perf_counter() - started[-1])
            cpu_steps[-1] = time.process_time() - cpu_steps[-1]

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))
                rewards.append(float(logs.get("reward", float("nan"))))

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            sync()
            begin = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync()
            rollout.append(time.perf_counter() - begin)
            return out

    with tempfile.TemporaryDirectory(prefix="grpo-trl-") as out:
        dtype = torch.bfloat16 if ours.bf16 else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(s["model_dir"])
        model = AutoModelForCausalLM.from_pretrained(s["model_dir"], dtype=dtype)
        peft_config = lora_config(ours, model)  # the very function our side uses: the same adapters
        trainer = TimedGRPOTrainer(
            model=model, reward_funcs=trl_reward_funcs(ours), args=trl_grpo_config(ours, s, out, cuda),
            train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in _rows()]), processing_class=tokenizer,
            peft_config=peft_config, callbacks=[Clock()],
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if len(rollout) != len(steps):
        raise RuntimeError(f"TRL generated {len(rollout)} times in {len(steps)} optimizer steps; expected one each")
    timed = slice(s["warmup"], None)
    update = [step - roll for step, roll in zip(steps[timed], rollout[timed], strict=True)]
    result = _summary(rollout[timed], update, ours.batch_size, lengths[timed])
    return {
        **result, "cpu_s_per_sample": sum(cpu_steps[timed]) / result["samples"], "peak_rss_mb": _peak_rss_mb(), "cuda_peak_mb": cuda_peak,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(), "trl_version": trl.__version__,
        "mean_reward": sum(rewards[timed]) / len(rewards[timed]) if rewards[timed] else None,
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(side: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``--worker`` for one side in a fresh process; a failure comes back as ``{"error": one line}``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({**settings, "side": side})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:] or ["no output"]
        return {"error": f"exit {done.returncode}: " + " | ".join(t[:300] for t in tail)}
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def worker_main(payload: str) -> int:
    """The ``--worker JSON`` side: everything but the result line goes to stderr."""
    import warnings

    warnings.filterwarnings("ignore")
    settings = json.loads(payload)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = (ours_worker if settings["side"] == "ours" else trl_worker)(settings)
    print(RESULT_PREFIX + json.dumps(result), file=stdout, flush=True)
    return 0


# ---- the table -------------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 10 else f"{value:.0f}"


def _target(ratio: float | None, target: float) -> str:
    if ratio is None:
        return f"<= {target:.2f}"
    return f"<= {target:.2f} ({'met' if ratio <= target else 'missed'})"


def comparison_rows(ours: dict[str, Any], theirs: dict[str, Any], cuda: bool) -> list[tuple[str, ...]]:
    """(measure, ours, TRL, ours/TRL, target) rows of one algorithm; a side that failed shows '-'."""
    rows = []
    for key, label, target in (
        ("rollout_s_per_sample", "rollout (s/sample)", None),
        ("update_s_per_sample", "update (s/sample)", None),
        ("seconds_per_sample", "rollout + update (s/sample)", TIME_TARGET),
        # CPU seconds move far less than wall time on a shared machine: the steadier time comparison there.
        ("cpu_s_per_sample", "CPU seconds per sample", TIME_TARGET),
        ("peak_rss_mb", "peak RSS (MiB)", None if cuda else MEMORY_TARGET),
        ("cuda_peak_mb", "CUDA peak (MiB)", MEMORY_TARGET if cuda else None),
        ("mean_completion_length", "mean completion length (tokens)", None),
    ):
        if key == "cuda_peak_mb" and not cuda:
            continue
        a, b = ours.get(key), theirs.get(key)
        ratio = a / b if a is not None and b else None
        shown = _target(ratio, target) if target is not None else ""
        digits = 1 if key == "mean_completion_length" else 4
        rows.append((label, _num(a, digits), _num(b, digits), f"{ratio:.2f}" if ratio is not None else "-", shown))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Plain-text table with a header: measure left, numbers right."""
    header = ("measure", "ours", "TRL 1.16", "ours/TRL", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def command_line(argv: list[str]) -> str:
    """How this run was started, to paste again."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return shlex.join([str(python), "bench/grpo_step.py", *argv])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma list of grpo, dapo, gspo")
    p.add_argument("--model", default=None, help="HF folder (default: the built-in SmolLM2-135M-Instruct, smollm2)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="completions per step (one optimizer step)")
    p.add_argument("--num-generations", type=int, default=d["num_generations"], help="completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=d["max_completion_length"])
    p.add_argument("--max-length", type=int, default=d["max_length"], help="ours: max_length (prompt + completion)")
    p.add_argument("--lora-r", type=int, default=d["lora_r"])
    p.add_argument("--lora-alpha", type=int, default=d["lora_alpha"])
    p.add_argument("--lora-layers", type=int, default=d["lora_layers"],
                   help="adapters on the last N layers on both sides (PEFT layers_to_transform); 0 = every layer")
    p.add_argument("--learning-rate", type=float, default=d["learning_rate"])
    p.add_argument("--steps", type=int, default=d["steps"], help="timed steps per side")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="steps run first and left out of the timing")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch threads in both workers")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--bf16", action="store_true", help="load the base in bf16 on both sides (TRL: bf16=True too)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--json", action="store_true", help="print every raw result as one JSON line too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one side in a fresh process
    args = p.parse_args(argv)
    if args.worker is None:
        args.algorithms = parse_list(p, "--algorithms", args.algorithms, ALGORITHMS)
        if args.steps < 1 or args.warmup < 0:
            p.error("--steps must be at least 1 and --warmup at least 0")
        if args.batch_size % args.num_generations:
            p.error("--batch-size must be a multiple of --num-generations")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs ours then TRL's for each algorithm and prints one table; exit 1 when a side failed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.model is None:
        from tandemlm.align.model import base_folder

        args.model = str(base_folder("smollm2"))
    import torch

    cuda = torch.cuda.is_available()
    settings = {
        "model_dir": args.model, "batch_size": args.batch_size, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "max_length": args.max_length, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "lora_layers": args.lora_layers, "learning_rate": args.learning_rate,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "seed": args.seed, "bf16": args.bf16,
    }
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for algorithm in args.algorithms:
        results[algorithm] = {}
        for side in SIDES:
            print(f"grpo bench: {algorithm} {side} ...", file=sys.stderr, flush=True)
            results[algorithm][side] = run_worker(side, {**settings, "algorithm": algorithm}, args.timeout)
    layers = f"last {args.lora_layers} layers" if args.lora_layers else "every layer"
    device, dtype = "cuda" if cuda else "cpu", "bf16" if args.bf16 else "fp32"
    prompts = args.batch_size // args.num_generations
    print(
        f"\ncommand: {command_line(argv)}\nmodel {args.model} ({device}, {dtype})\n"
        f"batch {args.batch_size} completions = {prompts} prompts x {args.num_generations}, "
        f"max completion {args.max_completion_length}, temperature 1, LoRA r {args.lora_r} alpha {args.lora_alpha} on "
        f"{layers}, one optimizer step per generation batch, {args.warmup} warm-up + {args.steps} timed steps, "
        f"threads {args.threads}\n"
    )
    failed = False
    for algorithm, sides in results.items():
        ours, theirs = sides["ours"], sides["trl"]
        print(f"{algorithm}")
        print(format_table(comparison_rows(ours, theirs, cuda)))
        notes = [f"{side}: not measured: {r['error']}" for side, r in sides.items() if "error" in r]
        failed = failed or bool(notes)
        if not notes:
            notes.append(f"trainable params ours {ours['trainable_params']:,}, TRL {theirs['trainable_params']:,}; "
                         f"torch threads ours {ours['threads']}, TRL {theirs['threads']}")
        print("\n".join(notes) + "\n")
    if args.json:
        print(json.dumps({"command": command_line(argv), "settings": settings, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
