"""PNG plots of a run's metrics.jsonl: one figure per quantity, drawn only when the run logged it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tandemlm.align.metrics import read_metrics
from tandemlm.storage.atomic import atomic_path

# One row per figure: file name -> (title, y label, metric keys; a key ending in /* matches a prefix).
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "loss": ("Training loss", "loss", ("loss", "eval_loss")),
    "reward": ("Reward", "reward", ("reward", "rewards/*/mean", "mean_reward", "eval_reward")),
    "kl": ("KL to the reference", "KL (nats/token)", ("kl", "eval_kl")),
    "margins": (
        "Chosen vs rejected",
        "implicit reward",
        ("rewards/margins", "rewards/chosen", "rewards/rejected", "margin", "eval_rewards/margins", "eval_margin"),
    ),
    "accuracy": ("Preference accuracy", "fraction", ("rewards/accuracies", "accuracy", "eval_rewards/accuracies", "eval_accuracy")),
    "length": ("Mean response length", "tokens", ("completions/mean_length", "eval_completions/mean_length")),
    # The RL trainer's health: the losses, and how far each update moved the policy (and how well PPO's critic predicts).
    "ppo_losses": ("Policy and value losses", "loss", ("policy_loss", "value_loss")),
    "ppo_update": ("Policy update", "value", ("clipfrac", "approx_kl", "explained_variance", "entropy", "eos_rate")),
    # The critic-free algorithms: how many responses moved the policy, and DAPO's dropped groups.
    "utilization": ("Responses with a non-zero advantage", "fraction", ("response_utilization",)),
    "groups": ("Groups dropped and re-sampled", "groups per step", ("groups_dropped", "groups_resampled")),
}


def _series(records: list[dict[str, Any]], pattern: str) -> dict[str, tuple[list[float], list[float]]]:
    found: dict[str, tuple[list[float], list[float]]] = {}
    prefix, _, suffix = pattern.partition("*")
    for record in records:
        for key, value in record.items():
            match = key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) if "*" in pattern else key == pattern
            if match and isinstance(value, (int, float)):
                xs, ys = found.setdefault(key, ([], []))
                xs.append(record.get("step", 0))
                ys.append(value)
    return found


def plot_metrics(metrics_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Draws each figure of :data:`PLOTS` that has data into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "warning" not in r]
    out = Path(out_dir)
    written = []
    for name, (title, ylabel, keys) in PLOTS.items():
        lines = {k: v for pattern in keys for k, v in _series(records, pattern).items()}
        if not lines:
            continue
        out.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        with atomic_path(path) as tmp:  # a viewer never sees half a PNG
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        written.append(path)
    return written
