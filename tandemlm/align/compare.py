"""Several alignment runs side by side: one row per run and one figure (``tandem align compare``).

A row reads only a run's files: ``metrics.jsonl``, ``run.json`` (method, wall time), ``config.yaml``
(batch size, to count samples a run did not log) and ``eval.json`` (``tandem align eval RUN``) when
present; no method's config class, so this sits in align's lower layer. Anything missing or damaged
reads as None (shown as "—"); only a folder that is not a run raises :class:`ConfigError`, naming it.
The figure: (a) train score against generated samples, so runs of different batch sizes line up by
the work done; (b) the reward–KL frontier, runs of one method joined in KL order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.errors import ConfigError
from tandemlm.align.metrics import read_metrics
from tandemlm.align.run_folder import read_run_folder
from tandemlm.storage.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

EVAL_FILE = "eval.json"
FIGURE_FILE = "compare.png"
MISSING = "—"
DERIVED_MARK = "*"
SCORE_KEYS = ("score", "reward")  # our RL trainers log `score`; TRL's GRPO logs only `reward`
LAST_SCORES = 3  # the final train score averages this many logged values: one step is noisy
ONE_RESPONSE_PER_PROMPT = frozenset({"ppo"})  # batch_size counts prompts, one response each
COMPLETION_BATCHED = frozenset({"grpo", "dapo", "gspo", "dcpo"})  # batch_size counts completions


@dataclass
class RunRow:
    """One run's outcome; None wherever the run did not log or record the number."""

    name: str
    path: str
    method: str | None = None
    steps: int | None = None
    samples: float | None = None
    samples_derived: bool = False  # counted as steps × samples per step, not logged
    train_score: float | None = None
    train_kl: float | None = None
    response_utilization: float | None = None
    clipfrac: float | None = None
    groups_dropped: float | None = None
    wall_time_s: float | None = None
    peak_memory_mb: float | None = None
    eval_policy_accuracy: float | None = None
    eval_reference_accuracy: float | None = None
    eval_gain_points: float | None = None
    eval_kl_per_token: float | None = None
    win_rate: float | None = None
    win_rate_judge: str | None = None
    curve: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (samples, score) per logged step

    def as_dict(self) -> dict[str, Any]:
        """The row's numbers for JSON (the curve left out: it is the metrics file again)."""
        values = asdict(self)
        values.pop("curve")
        return values


# ---------------------------------------------------------------------------------------------
# Reading runs


def read_rows(paths: Iterable[str | os.PathLike[str]]) -> list[RunRow]:
    """One row per run folder, in the order given; the first folder that is not a run raises ConfigError."""
    rows = [read_row(path) for path in paths]
    _disambiguate(rows)
    return rows


def read_row(path: str | os.PathLike[str]) -> RunRow:
    """One run folder's row; ConfigError naming the folder when it is not a run."""
    folder = read_run_folder(path)
    info = folder.read_info()
    config = _read_yaml(folder.config_file)
    method = info.get("method") or config.get("method")
    row = RunRow(name=folder.dir.name, path=str(folder.dir), method=str(method) if method else None)
    per_step = samples_per_step(row.method, config, processes(info))
    _fill_training(row, _step_records(read_metrics(folder.metrics)), per_step)
    if row.steps is None:
        row.steps = _int(info.get("global_step"))
    if row.samples is None and row.steps is not None and per_step is not None:
        row.samples, row.samples_derived = float(row.steps * per_step), True
    row.wall_time_s = _wall_time(info)
    _fill_eval(row, _read_json(folder.dir / EVAL_FILE))
    return row


def processes(info: dict[str, Any]) -> int:
    """How many processes trained the run: run.json's count if recorded, else one per rank digest, else 1."""
    for key in ("world_size", "processes", "num_processes"):
        count = _int(info.get(key))
        if count and count > 0:
            return count
    digests = info.get("rank_digests")  # finish_run records one per process when there were several
    return len(digests) if isinstance(digests, list) and digests else 1


def samples_per_step(method: str | None, config: dict[str, Any], world: int = 1) -> int | None:
    """Generated samples per training step from config.yaml, or None for a method that does not sample.

    PPO: ``batch_size`` prompts × 1 response × processes. The critic-free methods: ``batch_size``
    completions × processes; a TRL-era GRPO run (its config has no ``minibatch_size``) also × ``grad_accum``,
    as TRL generated for every micro-batch of an optimizer step, where our trainer splits one batch.
    """
    batch = _int(config.get("batch_size"))
    if batch is None or method is None:
        return None
    if method in ONE_RESPONSE_PER_PROMPT:
        return batch * world
    if method in COMPLETION_BATCHED:
        accum = 1 if "minibatch_size" in config else _int(config.get("grad_accum")) or 1
        return batch * accum * world
    return None


def _fill_training(row: RunRow, records: list[dict[str, Any]], per_step: int | None) -> None:
    """Fills the train columns and the score curve from the step records."""
    if not records:
        return
    row.steps = _int(records[-1].get("step"))
    if logged := _values(records, "samples"):
        row.samples = logged[-1]
    scores = _scores(records)
    row.train_score = _mean([score for _, score in scores][-LAST_SCORES:])
    kls = _values(records, "kl")
    row.train_kl = kls[-1] if kls else None
    row.response_utilization = _mean(_values(records, "response_utilization"))
    row.clipfrac = _mean(_values(records, "clipfrac"))
    dropped = _values(records, "groups_dropped")
    row.groups_dropped = sum(dropped) if dropped else None
    peaks = _values(records, "peak_memory_mb")
    row.peak_memory_mb = max(peaks) if peaks else None
    row.curve = [(x, score) for record, score in scores if (x := _samples_at(record, per_step)) is not None]


def _samples_at(record: dict[str, Any], per_step: int | None) -> float | None:
    """Samples generated up to this record: as logged, else step × samples per step."""
    logged = _number(record.get("samples"))
    if logged is not None:
        return logged
    step = _number(record.get("step"))
    return step * per_step if step is not None and per_step is not None else None


def _fill_eval(row: RunRow, report: dict[str, Any]) -> None:
    """Fills the held-out columns from eval.json (a policy run's; a reward run's has none of them)."""
    policy = _dig(report, "policy", "verifier_accuracy")
    reference = _dig(report, "reference", "verifier_accuracy")
    row.eval_policy_accuracy, row.eval_reference_accuracy = policy, reference
    if policy is not None and reference is not None:
        row.eval_gain_points = 100 * (policy - reference)
    row.eval_kl_per_token = _dig(report, "kl", "per_token")
    for judge in ("reward_model", "verifier"):  # the eval judges by the reward model when it had one
        rate = _dig(report, "win_rate", judge, "win_rate")
        if rate is not None:
            row.win_rate, row.win_rate_judge = rate, judge
            return


def _wall_time(info: dict[str, Any]) -> float | None:
    """Training seconds: finish_run/record_session keep their total in ``wall_time_s``, per session in ``seconds``."""
    total = _number(info.get("wall_time_s"))
    if total is not None:
        return total
    sessions = info.get("sessions") if isinstance(info.get("sessions"), list) else []
    seconds = [s for x in sessions if isinstance(x, dict) and (s := _number(x.get("seconds"))) is not None]
    return sum(seconds) if seconds else None


def _disambiguate(rows: list[RunRow]) -> None:
    """Runs named alike (runs/a/ppo, runs/b/ppo) get their parent folder in the name."""
    names = [row.name for row in rows]
    for row in rows:
        if names.count(row.name) > 1:
            row.name = f"{Path(row.path).parent.name}/{row.name}"


# ---------------------------------------------------------------------------------------------
# Small tolerant readers: a run still being written, or damaged, gives None, never an exception


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or malformed: the row shows it as missing
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training step records (warnings and rows without a step left out)."""
    return [r for r in records if "warning" not in r and _number(r.get("step")) is not None]


def _scores(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """(record, score) for each record that logged a score, under the first key of SCORE_KEYS any record has."""
    for key in SCORE_KEYS:
        found = [(r, v) for r in records if (v := _number(r.get(key))) is not None]
        if found:
            return found
    return []


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [v for r in records if (v := _number(r.get(key))) is not None]


def _number(value: Any) -> float | None:
    """A finite number as float; None for anything else (bools, strings, NaN)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _int(value: Any) -> int | None:
    return None if (number := _number(value)) is None else int(number)


def _dig(data: Any, *keys: str) -> float | None:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return _number(data)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# The table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# (header, RunRow field, format), after the run's name.
COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("method", "method", str),
    ("steps", "steps", str),
    ("samples", "samples", None),  # formatted in _cells: a derived count gets its mark
    ("train score", "train_score", lambda x: f"{x:.3f}"),
    ("train KL", "train_kl", lambda x: f"{x:.3g}"),
    ("resp. util.", "response_utilization", lambda x: f"{x:.2f}"),
    ("clipfrac", "clipfrac", lambda x: f"{x:.3f}"),
    ("groups dropped", "groups_dropped", lambda x: f"{x:.0f}"),
    ("wall time", "wall_time_s", _duration),
    ("peak MB", "peak_memory_mb", lambda x: f"{x:,.0f}"),
    ("eval acc", "eval_policy_accuracy", _pct),
    ("ref acc", "eval_reference_accuracy", _pct),
    ("gain (pts)", "eval_gain_points", lambda x: f"{x:+.1f}"),
    ("eval KL/tok", "eval_kl_per_token", lambda x: f"{x:.3g}"),
    ("win-rate", "win_rate", _pct),
)
HEADERS = ["run", *(header for header, _, _ in COLUMNS)]


def table_rows(rows: list[RunRow]) -> list[list[str]]:
    """The rows as text under :data:`HEADERS`: "—" where missing, derived sample counts marked with ``*``."""
    return [[row.name, *(_cell(row, name, fmt) for _, name, fmt in COLUMNS)] for row in rows]


def _cell(row: RunRow, name: str, fmt: Any) -> str:
    value = getattr(row, name)
    if value is None:
        return MISSING
    return fmt(value) if fmt else f"{value:,.0f}" + (DERIVED_MARK if row.samples_derived else "")


def table_note(rows: list[RunRow]) -> str:
    """The footnote the table needs: which sample counts are derived, and how."""
    derived = [row.name for row in rows if row.samples_derived]
    return "" if not derived else f"{DERIVED_MARK} samples not logged by {', '.join(derived)}: counted as steps × samples per step from config.yaml"


# ---------------------------------------------------------------------------------------------
# The figure


@dataclass(frozen=True)
class FrontierPoint:
    """One run on the reward–KL plane; ``basis`` says whether both numbers come from eval.json or training."""

    run: str
    kl: float
    value: float
    basis: str  # "eval" (gain in points vs eval KL/token) or "train" (final score vs last train KL)


def frontier_point(row: RunRow) -> FrontierPoint | None:
    """Eval gain against eval KL when evaluated, else train score against train KL (never one of each)."""
    if row.eval_gain_points is not None and row.eval_kl_per_token is not None:
        return FrontierPoint(row.name, row.eval_kl_per_token, row.eval_gain_points, "eval")
    if row.train_score is not None and row.train_kl is not None:
        return FrontierPoint(row.name, row.train_kl, row.train_score, "train")
    return None


def frontier_series(rows: list[RunRow]) -> dict[str, list[FrontierPoint]]:
    """Points by method (train-based points apart from eval-based ones), each series sorted by KL."""
    series: dict[str, list[FrontierPoint]] = {}
    for row in rows:
        point = frontier_point(row)
        if point is not None:
            key = (row.method or "?") + (" (train)" if point.basis == "train" else "")
            series.setdefault(key, []).append(point)
    return {key: sorted(points, key=lambda p: (p.kl, p.value)) for key, points in series.items()}


def compare_figure(rows: list[RunRow]) -> Figure:
    """The two-panel figure: (a) score against generated samples, (b) the reward–KL frontier."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (curves, frontier) = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw_curves(curves, rows)
    _draw_frontier(frontier, frontier_series(rows))
    fig.tight_layout()
    return fig


def write_figure(rows: list[RunRow], out: str | os.PathLike[str] = FIGURE_FILE) -> Path:
    """Draws :func:`compare_figure` to the PNG ``out`` atomically (a viewer never sees half a file)."""
    import matplotlib.pyplot as plt

    target = Path(out)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must be a file name ending in .png")
    fig = compare_figure(rows)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
    return target


def _draw_curves(ax: Axes, rows: list[RunRow]) -> None:
    drawn = [row for row in rows if row.curve]
    for row in drawn:
        xs, ys = zip(*row.curve, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=row.name)
    ax.set(title="(a) train score against generated samples", xlabel="generated samples", ylabel="train score")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run logged a score", ha="center", va="center", transform=ax.transAxes)


def _draw_frontier(ax: Axes, series: dict[str, list[FrontierPoint]]) -> None:
    for key, points in series.items():
        hollow = points[0].basis == "train"  # train-based points are hollow: another y unit
        ax.plot(
            [p.kl for p in points], [p.value for p in points], marker="s" if hollow else "o",
            markerfacecolor="none" if hollow else None, label=key,
        )
        for p in points:
            ax.annotate(p.run, (p.kl, p.value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    bases = {p.basis for points in series.values() for p in points}
    ylabel = "eval accuracy gain (points)" if bases == {"eval"} else "eval gain (points, ●) or final train score (□)"
    xlabel = "KL per token to the reference" + ("" if bases == {"eval"} else " (eval, else train)")
    ax.set(title="(b) reward–KL frontier", xlabel=xlabel, ylabel=ylabel)
    ax.margins(0.15)  # room for the run names beside the outermost points
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has a score and a KL", ha="center", va="center", transform=ax.transAxes)
