"""What the GPU memory benches share (``ppo_gpu_memory.py``, ``align_gpu_memory.py``): the random-initialised
DeepSeek-R1-Distill-Qwen-class models, the scripted reward, steps of tandem's RL trainer measured beside its memory
plan (:func:`measure_rl`: PPO, and GRPO in the align bench), one job per fresh process under a timeout and the
check's time budget, and the table they print and write.

A bench script runs each job (one method at one size) as ``python SCRIPT --worker JSON`` in a fresh process, so each
has its own peak memory and an out-of-memory job does not stop the others. The worker prints its result as one line
starting with :data:`RESULT_PREFIX` (trainers print their own log dicts to stdout, so a bare ``{`` is not enough).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "gpu-bench-result: "
# A job given less than this of the check's time budget is skipped, not started: it could not even build a model.
MIN_JOB_S = 15.0
# Keys that name a job in its result and in the table (a job is one size of one method).
JOB_KEYS = ("method", "size")

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


# ---------------------------------------------------------------------------------------------
# Models, tokenizer, reward


def qwen2_config(size: str) -> Any:
    """The transformers ``Qwen2Config`` of ``size`` (a key of :data:`SIZES`)."""
    from transformers import Qwen2Config

    if size not in SIZES:
        raise ValueError(f"--sizes: unknown size {size!r}; known: {', '.join(SIZES)}")
    return Qwen2Config(**COMMON, **SIZES[size])


def random_model(config: Any, bf16: bool) -> Any:
    """A causal LM of ``config`` with random weights, built directly on the GPU if there is one (bf16 or fp32).

    Random init straight on the device: a 7B never exists on the host, and nothing is downloaded or written.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                attn_implementation="sdpa")


def device_name() -> str:
    """The GPU's name, or ``cpu``."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def reset_peak() -> None:
    """Starts the peak-memory count here (on a GPU; on CPU the peak RSS cannot be reset)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measured_kind() -> str:
    """What ``peak_memory_mb`` measures on this machine (the PPO trainer's own measure, for every bench)."""
    import torch

    return "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS"


def default_tokenizer(folder: str | None) -> str:
    """``folder``, or the tiny Qwen2 fixture's tokenizer (R1-Distill-Qwen's specials)."""
    if folder is not None:
        return folder
    from tandemlm.testing.tiny_models import tiny_model

    return str(tiny_model("qwen2"))


def distinct_share(texts: Sequence[str]) -> list[float]:
    """A cheap scripted reward: the share of distinct characters in each text, in [0, 1] (no reward model)."""
    return [len(set(text)) / max(1, len(text)) for text in texts]


def scripted_score(rows: list[dict[str, Any]], texts: list[str]) -> list[float | None]:
    """The scripted reward (distinct-character share) as a source of the RL trainer's ``RewardMix``."""
    return list(distinct_share(texts))


# ---------------------------------------------------------------------------------------------
# Steps of tandem's RL trainer (PPO, GRPO) beside its memory plan


def measure_rl(job: dict[str, Any], config: Any, trainer_class: Any, *, verifier: bool = False) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Builds ``job["size"]`` on the device, runs ``job["steps"]`` steps of ``trainer_class`` (``PPOTrainer`` or
    ``GroupTrainer``) with ``config``; returns measured and planned memory and times, and each step's logged stats.

    The pieces are the ones ``tandem align`` runs (``actor_critic_from_model``, ``build_sampler``, ``Distributed``,
    the trainer); the prompts are random token ids of exactly ``job["prompt_length"]`` tokens, and the plan is
    ``plan.estimate(plan.inputs_from_config(model config, config))`` (the config's ``has_critic`` says whether a
    critic is planned). The reward is the scripted score; with ``verifier`` the rows also carry an arithmetic task
    random weights fail (0) and the mix starts with tandem's own verifier (``build_reward_mix``), as a run's would.
    """
    import torch
    from transformers import AutoTokenizer

    from tandemlm.align.model import set_threads
    from tandemlm.align.ppo.method import actor_critic_from_model, build_sampler
    from tandemlm.align.ppo.plan import MIB, estimate, inputs_from_config
    from tandemlm.align.ppo.rl_trainer import Distributed, peak_memory_mb
    from tandemlm.align.ppo.scoring import RewardMix, build_reward_mix

    c, cuda = config, torch.cuda.is_available()
    set_threads(c.threads)
    model_config = qwen2_config(job["size"])
    plan = estimate(inputs_from_config(model_config, c))
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    torch.manual_seed(c.seed)
    started = time.monotonic()
    model = random_model(model_config, bool(c.bf16))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    ac = actor_critic_from_model(c, model)
    built = time.monotonic() - started
    generator = torch.Generator().manual_seed(c.seed)
    rows_count = c.prompts_per_step * job["steps"]
    prompt_ids = torch.randint(0, len(tokenizer) - 1000, (rows_count, job["prompt_length"]), generator=generator)
    task = {"task": "arithmetic", "answer": "42"} if verifier else {}
    rows = [{"prompt": [], **task} for _ in range(rows_count)]
    folder = Path(job["tokenizer"])  # the base folder build_reward_mix / build_sampler would read: unused here
    reward = build_reward_mix(c, ac, tokenizer, folder) if verifier else RewardMix([])
    reward.sources.append(("distinct_chars", 1.0, scripted_score))
    sampler = build_sampler(c, ac, tokenizer, folder)
    trainer = trainer_class(c, ac, tokenizer, rows, prompt_ids.tolist(), reward, Distributed(), job["steps"], sampler)
    reset_peak()
    steps = []
    for _ in range(job["steps"]):
        stats = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        steps.append(stats)
    timed = steps[1:] or steps  # the first step warms kernels and checks the sampler's log-probs
    result = {
        "device": device_name(), "dtype": "bf16" if c.bf16 else "fp32",
        "gradient_checkpointing": bool(c.gradient_checkpointing), "params": plan.inputs.n_params,
        "measured_peak_mb": peak_memory_mb(), "measured": measured_kind(),
        "plan_peak_mb": plan.total / MIB, "plan_rollout_mb": plan.rollout_phase / MIB,
        "plan_update_mb": plan.update_phase / MIB, "build_s": built,
        "first_step_s": steps[0]["rollout_s"] + steps[0]["update_s"],
        "step_s": sum(s["rollout_s"] + s["update_s"] for s in timed) / len(timed),
        "rollout_s": sum(s["rollout_s"] for s in timed) / len(timed),
        "update_s": sum(s["update_s"] for s in timed) / len(timed),
        "tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
        "mean_response_length": sum(s["completions/mean_length"] for s in steps) / len(steps),
        "rollout_logprob_diff": steps[0].get("rollout_logprob_diff"), "steps": len(steps),
    }
    return result, steps


# ---------------------------------------------------------------------------------------------
# Jobs in fresh processes


def parse_list(parser: Any, flag: str, text: str, known: Sequence[str]) -> list[str]:
    """The comma list ``text`` of ``flag``; an unknown item ends the program with the known ones listed."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in known]
    if unknown or not items:
        parser.error(f"{flag}: unknown {', '.join(unknown) or 'nothing given'}; known: {', '.join(known)}")
    return items


def job_name(job: dict[str, Any]) -> dict[str, Any]:
    """The keys that name ``job`` (:data:`JOB_KEYS` it has)."""
    return {k: job[k] for k in JOB_KEYS if k in job}


def run_worker(argv_worker: str, measure: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The ``--worker JSON`` side: measures one job and prints its result line."""
    job = json.loads(argv_worker)
    print(RESULT_PREFIX + json.dumps({**job_name(job), **measure(job)}), flush=True)
    return 0


def run_job(script: Path, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``script --worker JSON`` in a fresh process; a failure comes back as ``{..., "error": one line}``."""
    command = [sys.executable, str(script), "--worker", json.dumps(job)]
    name = job_name(job)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    except subprocess.TimeoutExpired:
        return {**name, "error": f"ran past {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {**name, "error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def run_jobs(script: Path, jobs: list[dict[str, Any]], timeout: float, budget: float | None, label: str) -> list[dict[str, Any]]:
    """Each job under ``timeout`` seconds, in order, and all within ``budget`` seconds (None: no budget).

    A job starts with at most what is left of the budget; once less than :data:`MIN_JOB_S` is left, the rest
    come back as ``{..., "skipped": why}`` without starting, so the whole GPU check keeps to its time.
    """
    deadline = None if budget is None else time.monotonic() + budget
    results = []
    for job in jobs:
        name = job_name(job)
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left < MIN_JOB_S:
            results.append({**name, "skipped": "the check's time budget ran out"})
            continue
        print(f"{label}: {' '.join(map(str, name.values()))} ...", flush=True)
        results.append(run_job(script, job, left))
    return results


def failed(results: list[dict[str, Any]]) -> bool:
    """Whether a job failed (a skipped one did not: it was never started)."""
    return any("error" in r for r in results)


# ---------------------------------------------------------------------------------------------
# The table


def params_label(n: int) -> str:
    """``494000000`` -> ``0.49B``; small models in millions."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def not_run_row(result: dict[str, Any], lead: Sequence[str], width: int) -> tuple[str, ...]:
    """A row for a job that failed or was skipped: its name cells, dashes, and the reason in the last column."""
    reason = f"error: {result['error']}" if "error" in result else f"skipped: {result['skipped']}"
    return (*lead, *["-"] * (width - len(lead) - 1), reason)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])


def report(out: str | None, name: str, title: str, table: str, payload: dict[str, Any]) -> None:
    """Prints ``title`` and ``table``; with ``out``, writes ``name``.txt (the same) and ``name``.json (``payload``)."""
    print(f"{title}\n{table}", flush=True)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(payload, indent=2))
        (folder / f"{name}.txt").write_text(f"{title}\n{table}\n")
