"""Whether an aligned policy survives quantization: ``tandem align eval``'s measures on GGUF policies.

Every policy (the merged, unquantized f16/bf16 GGUF and each quantized type) answers the same
held-out prompts greedily through the same llama.cpp engine, so the differences are the
quantization's alone. Measured per policy, as the run's method defines them: the verifier's
accuracy (rows with a ``task``), the reward model's mean score (when the run or the caller names
one), and how often the policy's answer is the unquantized policy's answer word for word.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tandemlm.align.errors import ConfigError
from tandemlm.align.evaluate import _reward_scores, _split_rows, _verifier_scores
from tandemlm.align.registry import open_run

Status = Callable[[str], None]


def retained(
    run_dir: str | Path,
    policies: Mapping[str, Path],
    datasets: list[str] | None = None,
    prompts: int | None = None,
    max_new_tokens: int | None = None,
    reward_model: str | None = None,
    n_threads: int | None = None,
    status: Status | None = None,
) -> dict[str, Any]:
    """Evaluates each GGUF of ``policies`` (label → file; the first is the unquantized one) on the run's
    held-out prompts; returns the measures per label and each one's change from the first."""
    if not policies:
        raise ConfigError("no policies to evaluate")
    run = open_run(run_dir)
    refs = datasets or ([run.config.eval_dataset] if run.config.eval_dataset else [])
    if not refs:
        raise ConfigError(f"run {run.dir} has no eval_dataset; pass --eval DATASET")
    prompt_rows, pairs = _split_rows(refs)
    rows = (prompt_rows or [{"prompt": pair["prompt"]} for pair in pairs])[: prompts or run.config.eval_prompts]
    max_new = max_new_tokens or run.config.eval_max_new_tokens
    say = status or (lambda _message: None)
    texts = {label: _answers(path, rows, max_new, n_threads, lambda i, label=label: say(f"{label}: prompt {i}/{len(rows)}"))
             for label, path in policies.items()}
    judges = _verifier_scores(rows, texts)
    rm_ref = reward_model or getattr(run.config, "reward_model", None)
    if rm_ref:
        say("reward model: scoring the answers")
        judges["reward_model"] = _reward_scores(rm_ref, [row["prompt"] for row in rows], texts, 16)
    first = next(iter(policies))
    measures = {label: _measures(label, first, texts, judges) for label in policies}
    for label in measures:
        for key, value in list(measures[label].items()):
            base = measures[first][key]
            if key != "same_answer_as_unquantized" and value is not None and base is not None:
                measures[label][f"{key}_change"] = value - base
    return {"run": str(run.dir), "method": run.config.method, "datasets": refs, "prompts": len(rows),
            "max_new_tokens": max_new, "decoding": "greedy, llama.cpp", "policies": measures}


def _answers(path: Path, rows: list[dict[str, Any]], max_new: int, n_threads: int | None, tick: Callable[[int], None]) -> list[str]:
    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.load_options import LoadOptions
    from tandemlm.deploy.registry import load_engine
    from tandemlm.deploy.types import SamplingParams

    engine = load_engine(str(path), "llama.cpp", LoadOptions(n_threads=n_threads))
    try:
        params = SamplingParams(max_tokens=max_new, temperature=0.0)
        answers = []
        for i, row in enumerate(rows, 1):
            tick(i)
            answers.append(collect(engine.chat(row["prompt"], params)).text)
        return answers
    finally:
        engine.close()


def _measures(label: str, first: str, texts: dict[str, list[str]], judges: dict[str, dict[str, list[float | None]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for judge, scores in judges.items():
        valid = [s for s in scores[label] if s is not None]
        name = "verifier_accuracy" if judge == "verifier" else f"{judge}_score"
        out[name] = statistics.fmean(valid) if valid else None
    same = [a == b for a, b in zip(texts[label], texts[first], strict=True)]
    out["same_answer_as_unquantized"] = sum(same) / len(same) if same else None
    return out


def retained_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per policy, its measures and their change from the unquantized one."""
    from rich.table import Table

    policies = report["policies"]
    keys = [k for k in next(iter(policies.values())) if not k.endswith("_change")]
    table = Table(title=f"alignment retained ({report['prompts']} held-out prompts, {report['decoding']})", title_justify="left")
    table.add_column("policy")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    for label, values in policies.items():
        cells = []
        for key in keys:
            value, change = values.get(key), values.get(f"{key}_change")
            text = "-" if value is None else f"{value:.1%}" if key != "reward_model_score" else f"{value:.3f}"
            if change is not None and label != next(iter(policies)):
                text += f" ({change * 100:+.1f} pts)" if key != "reward_model_score" else f" ({change:+.3f})"
            cells.append(text)
        table.add_row(label, *cells)
    return table
