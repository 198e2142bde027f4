"""Alignment run folders as the UI reads them: a tolerant, minimal contract.

A run is a folder under the runs directory holding any of (``tandem align`` writes the first ones)::

    config.yaml      the run's settings (shown as text)
    run.json         method, base model, adapter or not (read if present)
    metrics.jsonl    one JSON object per logged step (reward, kl, length, loss, ...)
    *.png, plots/*.png
    merged/, final/  the trained policy as an HF folder (merged/ = base + LoRA adapter)
    policy/          or an HF folder / a folder with one .gguf under this name
    policy.gguf      or one GGUF file

A folder counts as a run when it has at least one of these. Missing or damaged pieces are shown
as missing, never raised. Pure functions, no Gradio. The names of align's files come from its
run-folder API (``align.run_folder.RunFolder``); ``policy/`` and ``policy.gguf`` are the UI's own
extras for policies made elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandemlm.align.compare import RunRow, read_row
from tandemlm.align.errors import ConfigError
from tandemlm.align.metrics import read_metrics
from tandemlm.align.run_folder import (
    CONFIG_FILE,
    FINAL_DIR,
    MERGED_DIR,
    METRICS_FILE,
    PLOTS_DIR,
    RUN_FILE,
    RunFolder,
)
from tandemlm.errors import EngineError

EXTERNAL_POLICY = "policy"  # a folder (HF, or one .gguf inside) that another tool put in a run
EXTERNAL_GGUF = "policy.gguf"
RUN_MARKERS = (CONFIG_FILE, RUN_FILE, METRICS_FILE, PLOTS_DIR, MERGED_DIR, FINAL_DIR, EXTERNAL_POLICY, EXTERNAL_GGUF)
POLICY_FOLDERS = (MERGED_DIR, FINAL_DIR, EXTERNAL_POLICY)  # HF folders, most usable first


@dataclass
class RunInfo:
    """What the Runs tab shows about one run folder."""

    name: str
    path: Path
    plots: list[Path] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config_text: str = ""
    policy: Path | None = None


def is_run_dir(path: Path) -> bool:
    """True when ``path`` is a folder with at least one run marker or plot."""
    return path.is_dir() and (any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("*.png")))


def list_runs(runs_dir: str | Path) -> list[RunInfo]:
    """Runs under ``runs_dir`` (newest first); an absent folder simply has no runs."""
    root = Path(runs_dir).expanduser()
    if not root.is_dir():
        return []
    runs = [read_run(p) for p in root.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: r.path.stat().st_mtime, reverse=True)


def read_run(path: Path) -> RunInfo:
    """Reads one run folder, tolerating any missing or damaged file."""
    run = RunFolder(path)
    plots = sorted(path.glob("*.png")) + run.plot_files()
    config = run.config_file
    config_text = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
    return RunInfo(
        name=path.name,
        path=path,
        plots=plots,
        metrics=read_metrics(run.metrics),
        config_text=config_text,
        policy=find_policy(path),
    )


def find_policy(run_dir: Path) -> Path | None:
    """The run's policy model (HF folder or .gguf file), or None when it has none (yet)."""
    if run_info(run_dir).get("method") == "reward":
        return None  # a reward model scores answers; it is not a policy to chat with
    for name in POLICY_FOLDERS:
        if (run_dir / name / "config.json").is_file():
            return run_dir / name
    ggufs = sorted((run_dir / EXTERNAL_POLICY).glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    single = run_dir / EXTERNAL_GGUF
    return single if single.is_file() else None


def run_info(run_dir: Path) -> dict[str, Any]:
    """run.json as a dict ({} when absent or unreadable)."""
    return RunFolder(Path(run_dir)).read_info()


def resolve_model_ref(ref: str) -> str:
    """Turns a run folder into its policy model path; any other reference passes through unchanged."""
    path = Path(ref).expanduser()
    if not is_run_dir(path) or (path / "config.json").is_file():
        return ref
    policy = find_policy(path)
    if policy is not None:
        return str(policy)
    if run_info(path).get("method") == "reward":
        raise EngineError(f"run {path} trained a reward model, not a policy")
    if any((path / name / "adapter_config.json").is_file() for name in POLICY_FOLDERS):
        raise EngineError(f"run {path} trained a LoRA adapter; merge it first: tandem merge {path}")
    raise EngineError(f"run {path} has no trained policy yet (merged/, final/, policy/ or policy.gguf)")


def metrics_summary(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """``[name, first, last, min, max]`` for each numeric metric, for a small table (4 significant digits).

    Full floats (0.6931471805599453) would make every column wide; 4 digits keep the table readable.
    """
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                columns.setdefault(key, []).append(float(value))
    return [[k, *(float(f"{x:.4g}") for x in (v[0], v[-1], min(v), max(v)))] for k, v in columns.items()]


def compare_rows(runs_dir: str | Path, names: list[str]) -> tuple[list[RunRow], list[str]]:
    """Comparison rows of the named runs, and one line per name that could not be read.

    The tab lists folders align did not write (a ``policy/`` dropped in, metrics only), which are not
    runs to compare: they are left out with a line saying why, and the rest are still compared.
    """
    rows, problems = [], []
    for name in names:
        try:
            rows.append(read_row(Path(runs_dir) / name))
        except (ConfigError, OSError) as exc:
            problems.append(f"`{name}`: {exc}")
    return rows, problems
