"""The vote panel's "Train DPO on these votes": start, a progress bar, and the new run as the policy.

One training job per app at a time (two CPU cores do not fit two); the handlers are plain
functions of the job holder so they can be tested without a browser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.model_refs import run_base
from tandemlm.ui.runs_tab import load_run_policy
from tandemlm.ui.votes.training import TrainJob, start_dpo

if TYPE_CHECKING:

    from tandemlm.ui.models_panel import ModelsPanel


class Trainer:
    """Holds the app's training job; each method returns what the panel shows."""

    def __init__(self, slots: dict[str, EngineSlot], votes_path: str, runs_dir: str) -> None:
        self.slots, self.votes_path, self.runs_dir = slots, votes_path, runs_dir
        self.job: TrainJob | None = None

    def default_model(self) -> str:
        """What to train: the policy's base when the policy is a run, else the reference (the base the votes judge)."""
        return run_base(self.slots["policy"].model) or self.slots["reference"].model

    def start(self, model: str, steps: float) -> tuple[str, bool]:
        """Starts training unless a job runs; returns (status line, whether to poll)."""
        if self.job is not None and self.job.running():
            return f"Already training: {self.job.status()}", True
        try:
            self.job = start_dpo(self.votes_path, model, self.runs_dir, int(steps))
        except (ValueError, OSError) as exc:
            return f"⚠ {exc}", False
        return self.job.status(), True

    def poll(self) -> tuple[str, bool]:
        """(status line, whether to keep polling)."""
        if self.job is None:
            return "", False
        return self.job.status(), self.job.running()

    def load(self) -> tuple[str, str, str, str]:
        """The finished run as the policy, its base (adapter off) as the reference: as Runs → Compare with base."""
        boxes = self.slots["policy"].model, self.slots["reference"].model
        if self.job is None or not self.job.succeeded():
            return *boxes, "", "No finished training run to load yet."
        return load_run_policy(self.slots, str(self.job.run_dir.parent), self.job.name)


def build_training_panel(slots: dict[str, EngineSlot], votes_path: str, runs_dir: str, models: ModelsPanel) -> Trainer:
    """Lays out the training controls; call inside the Compare tab under the vote panel."""
    import gradio as gr

    trainer = Trainer(slots, votes_path, runs_dir)
    with gr.Accordion("Train DPO on these votes", open=False):
        with gr.Row():
            model = gr.Textbox(trainer.default_model, label="model to train (LoRA, cpu-demo settings)", scale=4, elem_id="train-model")
            steps = gr.Number(30, precision=0, minimum=1, label="steps", scale=1, elem_id="train-steps")
            start = gr.Button("Train DPO on these votes", variant="primary", scale=1, elem_id="train-start")
        status = gr.Markdown(elem_id="train-status")
        load = gr.Button("Load the trained run as the policy", size="sm", elem_id="train-load")
    timer = gr.Timer(1.0, active=False)

    def begin(name: str, count: float) -> tuple[Any, Any]:
        line, polling = trainer.start(name, count)
        return line, gr.Timer(active=polling)

    def tick() -> tuple[Any, Any]:
        line, polling = trainer.poll()
        return line, gr.Timer(active=polling)

    start.click(begin, [model, steps], [status, timer])
    timer.tick(tick, outputs=[status, timer], show_progress="hidden")
    load.click(lambda: trainer.load(), outputs=[models.boxes["policy"], models.boxes["reference"], models.status, status])
    return trainer
