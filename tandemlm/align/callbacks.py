"""Trainer callbacks every method shares: metrics.jsonl + plots, the reward-hacking watch, a rich bar.

They only observe (``on_log``, ``on_save``, ...), so they work with any transformers ``Trainer``,
TRL's or our own PPO loop, and write only on the main process.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from tandemlm.align.metrics import append_jsonl, truncate_metrics
from tandemlm.align.plots import plot_metrics

if TYPE_CHECKING:
    from rich.progress import Progress

    from tandemlm.align.run_folder import RunFolder

# Mean completion length, and the task score to hold it against (the verifier when there is one).
LENGTH_KEYS = ("completions/mean_length",)
SCORE_KEYS = ("rewards/verifier/mean", "reward")
# Shown beside the progress bar, in this order, when a method logs them.
SHOWN_KEYS = ("loss", "reward", "rewards/verifier/mean", "kl", "rewards/margins", "margin", "accuracy", "completions/mean_length")


def _numbers(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


class MetricsLogger(TrainerCallback):
    """Appends every log to metrics.jsonl and redraws the plots at each checkpoint and at the end."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.started = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            truncate_metrics(self.run.metrics, state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.monotonic() - self.started, 2)}
        append_jsonl(self.run.metrics, {**record, **_numbers(logs)})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._plot(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._plot(state)

    def _plot(self, state: Any) -> None:
        if state.is_world_process_zero:
            plot_metrics(self.run.metrics, self.run.plots)


# ---------------------------------------------------------------------------------------------
# Reward hacking: the policy writes longer and longer while the task score stays where it was.


def hacking_signature(
    lengths: list[float], scores: list[float], window: int = 5, min_rise: float = 0.25, flat: float = 0.05
) -> str | None:
    """A warning when mean length rose by ``min_rise`` (relative) while the score moved less than ``flat``.

    Compares the mean of the first ``window`` logs with the last ``window``. ``flat`` is absolute
    for scores in [0, 1] (verifier accuracy) and relative to the score's size beyond that.
    """
    if len(lengths) < 2 * window or len(scores) < 2 * window:
        return None
    length_before, length_now = _mean(lengths[:window]), _mean(lengths[-window:])
    score_before, score_now = _mean(scores[:window]), _mean(scores[-window:])
    if length_before <= 0 or (length_now - length_before) / length_before < min_rise:
        return None
    if abs(score_now - score_before) > flat * max(1.0, abs(score_before)):
        return None
    return (
        f"mean response length rose from {length_before:.1f} to {length_now:.1f} tokens while the task score "
        f"stayed at {score_before:.3f} -> {score_now:.3f}: the reward-hacking signature (check rewards, beta, samples)"
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class HackingWatch(TrainerCallback):
    """Warns once (console, metrics.jsonl, run.json) when :func:`hacking_signature` fires."""

    def __init__(self, run: RunFolder, window: int = 5) -> None:
        self.run = run
        self.window = window
        self.lengths: list[float] = []
        self.scores: list[float] = []
        self.warned = False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or self.warned or not state.is_world_process_zero:
            return
        length = next((logs[k] for k in LENGTH_KEYS if k in logs), None)
        score = next((logs[k] for k in SCORE_KEYS if k in logs), None)
        if length is None or score is None:
            return
        self.lengths.append(float(length))
        self.scores.append(float(score))
        message = hacking_signature(self.lengths, self.scores, self.window)
        if message:
            self.warned = True
            from rich.console import Console

            Console(stderr=True).print(f"[bold yellow]warning[/] step {state.global_step}: {message}")
            append_jsonl(self.run.metrics, {"step": state.global_step, "warning": message})
            self.run.update_info(warnings=[*self.run.info().get("warnings", []), message])


# ---------------------------------------------------------------------------------------------
# Progress


class RichProgress(TrainerCallback):
    """A rich progress bar with the latest key metrics; plain log lines when stderr is not a terminal."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.progress: Progress | None = None
        self.task: Any = None
        self.interactive = sys.stderr.isatty()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{self.method}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=console, disable=not self.interactive,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.method, total=state.max_steps, completed=state.global_step, metrics="")
        if state.global_step:
            console.print(f"resumed at step {state.global_step}/{state.max_steps}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.progress is None or not logs:
            return
        shown = "  ".join(f"{k.split('/')[-2] if k.endswith('/mean') else k}={logs[k]:.4g}" for k in SHOWN_KEYS if k in logs)
        self.progress.update(self.task, metrics=shown)
        if not self.interactive:
            self.progress.console.print(f"{self.method} step {state.global_step}/{state.max_steps}  {shown}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
