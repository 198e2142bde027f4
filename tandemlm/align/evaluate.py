"""``tandem align eval RUN``: the trained policy against its reference on held-out data.

For a policy run (sft, dpo, kto, grpo, ppo), on held-out prompts, both models sample responses
with the same seed, and the report gives: verifier task accuracy (rows with ``task``/``answer``),
reward-model score (``--reward-model``, or the GRPO run's own), mean response length, KL(policy ||
reference) estimated on the policy's samples, and the policy's win-rate over the reference judged
by the reward model (else the verifier): ``(wins + ties / 2) / pairs``. On held-out preference
pairs it gives DPO's implicit-reward margin ``beta * (log-ratio of chosen - log-ratio of rejected)``
and how often it is positive. For a reward run it gives pairwise accuracy on held-out pairs.

The reference of a LoRA run is the same weights with the adapter disabled; of a full fine-tune,
the base folder. Results go to ``RUN/eval.json`` (written atomically) and a table.
"""

from __future__ import annotations

import json
import statistics
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandemlm.align.data import load_rows
from tandemlm.align.errors import ConfigError
from tandemlm.align.model import inference_load_kwargs, load_tokenizer, set_threads
from tandemlm.align.prepare import quiet_libraries
from tandemlm.align.registry import open_run
from tandemlm.align.rewards import load_reward_model, score_conversations, verifier
from tandemlm.align.run import Run
from tandemlm.align.sampling import conversation_logprob, generate, response_logprobs
from tandemlm.hardware import inference_precision
from tandemlm.storage.atomic import atomic_write_text

EXAMPLES = 3  # prompt/policy/reference triples kept in the report for a human to read


@dataclass
class EvalOptions:
    datasets: list[str] = field(default_factory=list)
    reward_model: str | None = None
    prompts: int | None = None
    samples: int = 1
    max_new_tokens: int | None = None
    temperature: float = 1.0
    seed: int = 0
    threads: int = 0
    batch_size: int = 16
    device: str = "auto"  # auto, cpu or cuda: hardware.inference_precision picks the dtype for it

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples must be a positive integer, got {self.samples}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be zero or more, got {self.temperature}")
        if self.prompts is not None and self.prompts < 1:
            raise ConfigError(f"prompts must be a positive integer, got {self.prompts}")


def evaluate_run(run_dir: str | Path, options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluates a run on held-out data (read and checked before any model loads); writes eval.json."""

    quiet_libraries()
    options = options or EvalOptions()
    run = open_run(run_dir)
    refs = options.datasets or ([run.config.eval_dataset] if run.config.eval_dataset else [])
    if not refs:
        raise ConfigError(f"run {run.dir} has no eval_dataset; pass --dataset FILE")
    prompt_rows, pair_rows = _split_rows(refs)
    inference_precision(options.device)  # a bad or unusable --device fails before any model loads
    set_threads(options.threads or run.config.threads)
    if run.config.method == "reward":
        report = _eval_reward_run(run, pair_rows, options)
    else:
        report = _eval_policy_run(run, prompt_rows, pair_rows, options)
    report = {"run": str(run.dir), "method": run.config.method, "base_model": str(run.base_model), "datasets": refs, **report}
    atomic_write_text(run.dir / "eval.json", json.dumps(report, indent=2) + "\n")
    return report


def _split_rows(refs: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    prompts, pairs = [], []
    for ref in refs:
        rows, fmt, _ = load_rows(ref, "eval", keep_extra=True)
        (pairs if fmt.name == "preference" else prompts).extend(rows)
    return prompts, pairs


# ---------------------------------------------------------------------------------------------
# Reward runs


def _eval_reward_run(run: Run, pairs: list[dict[str, Any]], options: EvalOptions) -> dict[str, Any]:

    if not pairs:
        raise ConfigError("a reward run is evaluated on preference pairs (prompt/chosen/rejected); pass --dataset")
    pairs = pairs[: options.prompts] if options.prompts else pairs
    model, tokenizer = load_reward_model(run.dir, device=options.device)
    bar = EvalProgress(2 * len(pairs))
    bar.stage(f"reward model: scoring {len(pairs)} held-out pairs")
    chosen = score_conversations(model, tokenizer, [r.get("prompt", []) + r["chosen"] for r in pairs], options.batch_size, bar.advance)
    rejected = score_conversations(model, tokenizer, [r.get("prompt", []) + r["rejected"] for r in pairs], options.batch_size, bar.advance)
    bar.close()
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    by_kind: dict[str, list[float]] = {}
    for row, margin in zip(pairs, margins, strict=True):
        by_kind.setdefault(str(row.get("kind", "all")), []).append(margin)
    return {
        "pairs": {
            "n": len(pairs),
            "accuracy": _fraction(m > 0 for m in margins),
            "mean_margin": statistics.fmean(margins),
            "by_kind": {k: {"n": len(v), "accuracy": _fraction(m > 0 for m in v)} for k, v in sorted(by_kind.items())},
        }
    }


# ---------------------------------------------------------------------------------------------
# Policy runs


class EvalProgress:
    """A rich bar over the eval's work (rows generated or scored); stage lines when not a terminal."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=total)

    def stage(self, description: str) -> None:
        self.progress.update(self.task, description=description)
        if not self.console.is_terminal:
            self.console.print(f"eval: {description}")

    def advance(self, rows: int) -> None:
        self.progress.advance(self.task, rows)

    def close(self) -> None:
        self.progress.stop()


class ModelPair:
    """The trained policy and its reference, sharing weights when the run trained an adapter."""

    def __init__(self, run: Run, device: str = "auto") -> None:
        from transformers import AutoModelForCausalLM

        precision = inference_precision(device, checkpoint=run.base_model)
        kwargs = inference_load_kwargs(precision, four_bit=run.is_adapter and run.trained_in_4bit)

        self.tokenizer = load_tokenizer(run.final if run.final.is_dir() else run.base_model)
        base = AutoModelForCausalLM.from_pretrained(run.base_model, **kwargs).eval()
        if run.is_adapter:
            from peft import PeftModel

            self.policy = PeftModel.from_pretrained(base, run.final).eval()
            self.reference = None  # the policy with the adapter disabled
        else:
            self.policy = AutoModelForCausalLM.from_pretrained(run.model_folder(), **kwargs).eval()
            self.reference = base

    @contextmanager
    def use(self, which: str) -> Any:
        """Yields the model for ``which`` (``policy`` or ``reference``)."""
        if which == "policy":
            yield self.policy
        elif self.reference is not None:
            yield self.reference
        else:
            context: AbstractContextManager[Any] = self.policy.disable_adapter() if hasattr(self.policy, "disable_adapter") else nullcontext()
            with context:
                yield self.policy


def _eval_policy_run(run: Run, prompt_rows: list[dict[str, Any]], pairs: list[dict[str, Any]], options: EvalOptions) -> dict[str, Any]:

    if not prompt_rows:
        prompt_rows = _prompts_of(pairs)
    limit = options.prompts or run.config.eval_prompts
    rows = [row for row in prompt_rows[:limit] for _ in range(options.samples)]
    prompts = [row["prompt"] for row in rows]
    max_new = options.max_new_tokens or run.config.eval_max_new_tokens
    pair = ModelPair(run, options.device)
    samples, logps = {}, {}
    rm_ref = options.reward_model or getattr(run.config, "reward_model", None)
    n_pairs = len(pairs[: options.prompts or len(pairs)])
    bar = EvalProgress(4 * len(rows) + (2 * len(rows) if rm_ref else 0) + 4 * n_pairs)
    for which in ("policy", "reference"):
        with pair.use(which) as model:
            bar.stage(f"{which}: sampling {len(rows)} responses")
            samples[which] = generate(model, pair.tokenizer, prompts, max_new, options.temperature, options.seed, options.batch_size, bar.advance)
            bar.stage(f"{which}: scoring the policy's responses (KL)")
            logps[which] = response_logprobs(model, pair.tokenizer, prompts, [s.token_ids for s in samples["policy"]], options.batch_size, bar.advance)
    texts = {which: [s.text for s in samples[which]] for which in samples}
    report: dict[str, Any] = {
        "settings": {"prompts": len(prompt_rows[:limit]), "samples": options.samples, "max_new_tokens": max_new,
                     "temperature": options.temperature, "seed": options.seed},
        "policy": {"mean_length": _mean_len(samples["policy"])},
        "reference": {"mean_length": _mean_len(samples["reference"])},
        "kl": _kl(logps["policy"], logps["reference"], options.temperature),
    }
    judges = _verifier_scores(rows, texts)
    if rm_ref:
        bar.stage("reward model: scoring responses")
        judges["reward_model"] = _reward_scores(rm_ref, prompts, texts, options.batch_size, options.device)
        bar.advance(2 * len(rows))
    for judge, scores in judges.items():
        for which in ("policy", "reference"):
            valid = [s for s in scores[which] if s is not None]
            report[which][f"{judge}_{'accuracy' if judge == 'verifier' else 'score'}"] = statistics.fmean(valid) if valid else None
    report["win_rate"] = {judge: _win_rate(scores["policy"], scores["reference"]) for judge, scores in judges.items()}
    if pairs:
        bar.stage(f"held-out pairs: margins of {n_pairs} pairs")
        report["pairs"] = _pair_margins(pair, pairs[: options.prompts or len(pairs)], getattr(run.config, "beta", 1.0), bar.advance)
    bar.close()
    report["examples"] = [
        {"prompt": prompts[i][-1]["content"], "policy": texts["policy"][i], "reference": texts["reference"][i]}
        for i in range(0, min(len(prompts), EXAMPLES * options.samples), options.samples)
    ]
    return report


def _prompts_of(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, rows = set(), []
    for row in pairs:
        key = json.dumps(row.get("prompt"))
        if row.get("prompt") and key not in seen:
            seen.add(key)
            rows.append({"prompt": row["prompt"]})
    if not rows:
        raise ConfigError("no held-out prompts: pass a --dataset with a prompt column")
    return rows


def _mean_len(samples: list[Any]) -> float:
    return statistics.fmean(len(s.token_ids) for s in samples) if samples else 0.0


def _kl(policy: list[list[float]], reference: list[list[float]], temperature: float) -> dict[str, Any]:
    """KL(policy || reference) estimated on the policy's own samples, per response and per token."""
    diffs = [sum(p) - sum(r) for p, r in zip(policy, reference, strict=True)]
    tokens = sum(len(p) for p in policy) or 1
    note = None if temperature == 1.0 else "samples drawn at temperature != 1: a biased estimate of KL"
    return {"per_response": statistics.fmean(diffs) if diffs else 0.0, "per_token": sum(diffs) / tokens, "note": note}


def _verifier_scores(rows: list[dict[str, Any]], texts: dict[str, list[str]]) -> dict[str, dict[str, list[float | None]]]:

    if not any("task" in row for row in rows):
        return {}
    tasks, answers = [row.get("task") for row in rows], [row.get("answer") for row in rows]
    return {"verifier": {w: verifier([], t, task=tasks, answer=answers) for w, t in texts.items()}}


def _reward_scores(
    ref: str, prompts: list[Any], texts: dict[str, list[str]], batch_size: int, device: str = "auto"
) -> dict[str, list[float | None]]:

    model, tokenizer = load_reward_model(ref, device=device)
    return {
        which: list(score_conversations(model, tokenizer, [[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, ts, strict=True)], batch_size))
        for which, ts in texts.items()
    }


def _win_rate(policy: list[float | None], reference: list[float | None]) -> dict[str, Any]:
    wins = ties = losses = 0
    for p, r in zip(policy, reference, strict=True):
        if p is None or r is None:
            continue
        wins, ties, losses = wins + (p > r), ties + (p == r), losses + (p < r)
    n = wins + ties + losses
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / n if n else None}


def _pair_margins(pair: ModelPair, rows: list[dict[str, Any]], beta: float, progress: Any = None) -> dict[str, Any]:

    prompts = [r.get("prompt", []) for r in rows]
    logp: dict[str, dict[str, list[float]]] = {}
    for which in ("policy", "reference"):
        with pair.use(which) as model:
            logp[which] = {k: conversation_logprob(model, pair.tokenizer, prompts, [r[k] for r in rows], progress) for k in ("chosen", "rejected")}
    return pair_margin_report(logp["policy"], logp["reference"], beta)


def pair_margin_report(policy: dict[str, list[float]], reference: dict[str, list[float]], beta: float) -> dict[str, Any]:
    """DPO's implicit-reward margin per pair from summed log-probs (``chosen``/``rejected`` lists per model).

    ``beta * ((policy chosen - reference chosen) - (policy rejected - reference rejected))``, its mean,
    and the fraction of pairs where it is positive.
    """
    margins = [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(policy["chosen"], reference["chosen"], policy["rejected"], reference["rejected"], strict=True)
    ]
    return {"n": len(margins), "beta": beta, "mean_margin": statistics.fmean(margins), "accuracy": _fraction(m > 0 for m in margins)}


def _fraction(flags: Any) -> float:
    values = list(flags)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# Printing


def print_report(report: dict[str, Any]) -> None:
    """A rich table of the report (the JSON is in RUN/eval.json)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{report['method']}[/] run {report['run']}  (data: {', '.join(report['datasets'])})")
    if "policy" in report:
        table = Table("metric", "policy", "reference", "difference")
        for key in report["policy"]:
            p, r = report["policy"][key], report["reference"].get(key)
            table.add_row(key, _fmt(p), _fmt(r), _fmt(p - r) if p is not None and r is not None else "-")
        kl = report["kl"]
        table.add_row("KL to reference (per response / per token)", f"{kl['per_response']:.3f} / {kl['per_token']:.4f}", "0", "")
        for judge, result in report.get("win_rate", {}).items():
            table.add_row(f"win-rate by {judge} (W/T/L)", _fmt(result["win_rate"]), "", f"{result['wins']}/{result['ties']}/{result['losses']}")
        console.print(table)
    if "pairs" in report:
        pairs = report["pairs"]
        console.print(f"held-out pairs: n={pairs['n']}  accuracy={pairs['accuracy']:.3f}  mean margin={pairs['mean_margin']:.3f}")
        for kind, result in pairs.get("by_kind", {}).items():
            console.print(f"  {kind}: accuracy {result['accuracy']:.3f} (n={result['n']})")
    console.print(f"saved {Path(report['run']) / 'eval.json'}")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
