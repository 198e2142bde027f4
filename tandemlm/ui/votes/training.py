"""Votes → training: `tandem align dpo --dataset <votes>` in the background, its progress, its run.

The votes file is TRL preference data as it stands (ties and both-bad are skipped by the loader),
so training is the ordinary CLI in a subprocess: the app stays responsive, a crash in training
cannot take it down, and the run folder is exactly what `tandem align dpo` writes. Progress is
read from the run's metrics.jsonl (one line per logged step). Pure process handling, no Gradio.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tandemlm.align.metrics import read_metrics
from tandemlm.ui.votes.records import read_pairs

DEFAULT_FLAGS = ("--preset", "cpu-demo")  # LoRA on the last layers, short sequences: fits 2 CPU cores


@dataclass
class TrainJob:
    """One background DPO run on the votes."""

    run_dir: Path
    max_steps: int
    process: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def step(self) -> int:
        """The last logged optimizer step (0 before the first)."""
        steps = [int(row["step"]) for row in read_metrics(self.run_dir / "metrics.jsonl") if isinstance(row.get("step"), int)]
        return max(steps, default=0)

    def running(self) -> bool:
        return self.process.poll() is None

    def succeeded(self) -> bool:
        """Finished with exit code 0 and a saved final/ model."""
        return self.process.poll() == 0 and (self.run_dir / "final").is_dir()

    def status(self) -> str:
        """One Markdown line: a progress bar while it runs, then the outcome (the log's last line on failure)."""
        step, elapsed = self.step(), time.monotonic() - self.started
        if self.running():
            done = min(step / self.max_steps, 1.0) if self.max_steps > 0 else 0.0
            bar = "█" * round(done * 20) + "░" * (20 - round(done * 20))
            return f"Training `{self.name}`: `{bar}` step {step}/{self.max_steps} ({elapsed:.0f} s)"
        if self.succeeded():
            return f"✓ Trained `{self.name}` ({step} steps, {elapsed:.0f} s) in `{self.run_dir}`: load it as the policy below."
        return f"⚠ training `{self.name}` failed (exit {self.process.returncode}): {last_line(self.log)}"

    def stop(self) -> None:
        """Ends the training process (the app is closing or the user asked)."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def last_line(log: Path) -> str:
    """The last non-empty line of ``log`` (the CLI prints its one-line error last)."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"


def dpo_command(votes: Path, model: str, run_dir: Path, max_steps: int, flags: tuple[str, ...] = DEFAULT_FLAGS) -> list[str]:
    """The `tandem align dpo` command line that trains ``model`` on ``votes`` into ``run_dir``."""
    return [
        sys.executable, "-m", "tandemlm.cli.main", "align", "dpo", *flags,
        "--dataset", str(votes), "--model", model, "--output-dir", str(run_dir), "--max-steps", str(max_steps),
    ]


def start_dpo(
    votes_path: str, model: str, runs_dir: str, max_steps: int, flags: tuple[str, ...] = DEFAULT_FLAGS
) -> TrainJob:
    """Starts DPO on the votes in the background; ValueError (one line) when there is nothing to train on."""
    votes = Path(votes_path).expanduser().resolve()
    if not votes.is_file():
        raise ValueError(f"no votes yet: {votes} does not exist")
    pairs = len(read_pairs(votes))
    if pairs == 0:
        raise ValueError(f"{votes} has no usable pairs yet (ties and both-bad are not DPO pairs): vote left or right")
    if max_steps < 1:
        raise ValueError(f"steps must be at least 1, got {max_steps}")
    if not model.strip():
        raise ValueError("name the model to train (the base the votes should improve)")
    run_dir = Path(runs_dir).expanduser().resolve() / f"votes-dpo-{time.strftime('%Y%m%d-%H%M%S')}"
    handle, log_name = tempfile.mkstemp(prefix=f"{run_dir.name}-", suffix=".log")
    with open(handle, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            dpo_command(votes, model.strip(), run_dir, max_steps, flags),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    return TrainJob(run_dir, max_steps, process, Path(log_name))
