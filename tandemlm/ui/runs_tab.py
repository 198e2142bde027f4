"""Runs tab: alignment runs under the runs folder, their plots and metrics, and "load policy into Compare"."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.models_panel import ModelsPanel, load_slot
from tandemlm.ui.runs import find_policy, list_runs, metrics_summary, read_run, run_info

if TYPE_CHECKING:
    import gradio as gr

SUMMARY_HEADERS = ["metric", "first", "last", "min", "max"]


def run_names(runs_dir: str) -> list[str]:
    """Names of the runs under ``runs_dir``, newest first."""
    return [run.name for run in list_runs(runs_dir)]


def show_run(runs_dir: str, name: str | None) -> tuple[list[tuple[str, str]], list[list[Any]], str, str]:
    """(plots with captions, metrics summary rows, config.yaml text, status line) for one run."""
    if not name:
        count = len(run_names(runs_dir))
        return [], [], "", f"{count} runs in `{runs_dir}`." if count else f"No runs in `{runs_dir}` yet."
    path = Path(runs_dir) / name
    if not path.is_dir():
        return [], [], "", f"⚠ run `{name}` is gone from `{runs_dir}`."
    run = read_run(path)
    policy = f"policy: `{run.policy}`" if run.policy else "no policy saved yet"
    status = f"`{run.name}`: {len(run.metrics)} logged steps, {len(run.plots)} plots, {policy}."
    return [(str(p), p.stem) for p in run.plots], metrics_summary(run.metrics), run.config_text, status


def load_run_policy(slots: dict[str, EngineSlot], runs_dir: str, name: str | None) -> tuple[str, str, str, str]:
    """Makes the run's policy the policy slot, and its base model (if still there) the reference.

    Returns (policy box, reference box, models status, run status); a load error is shown, not raised.
    """
    boxes = slots["policy"].model, slots["reference"].model
    if not name:
        return *boxes, "", "Pick a run first."
    path = Path(runs_dir) / name
    if find_policy(path) is None:
        return *boxes, "", f"⚠ run `{name}` has no policy to load (see the folder list under Runs)."
    base = str(run_info(path).get("base_model") or "")
    if base and Path(base).exists():
        load_slot(slots, "reference", base, "auto")
    status = load_slot(slots, "policy", str(path), "auto")
    error = slots["policy"].error
    note = f"⚠ {error}" if error else f"Loaded `{name}` as the policy" + (" (its base model as the reference)" if base else "")
    return slots["policy"].model, slots["reference"].model, status, note


def build_runs_tab(slots: dict[str, EngineSlot], runs_dir: str, models: ModelsPanel, tabs: gr.Tabs) -> None:
    """Lays out the Runs tab; ``models`` and ``tabs`` are updated when a run's policy is loaded."""
    import gradio as gr

    with gr.Row():
        pick = gr.Dropdown(run_names(runs_dir), value=None, label=f"run (in {runs_dir})", scale=4, elem_id="runs-pick")
        refresh = gr.Button("Refresh", scale=0, min_width=90)
        load = gr.Button("Load policy into Compare", variant="primary", scale=1, elem_id="runs-load")
    status = gr.Markdown(show_run(runs_dir, None)[3], elem_id="runs-status")
    plots = gr.Gallery(label="plots", columns=2, height="auto", format="png", elem_id="runs-plots")
    with gr.Row():
        summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="metrics (metrics.jsonl)", interactive=False)
        config = gr.Code(label="config.yaml", language="yaml", interactive=False)

    refresh.click(lambda: gr.Dropdown(choices=run_names(runs_dir)), outputs=pick, queue=False)
    pick.change(lambda name: show_run(runs_dir, name), pick, [plots, summary, config, status])

    def load_policy(name: str | None) -> tuple[Any, ...]:
        policy_box, reference_box, model_status, run_status = load_run_policy(slots, runs_dir, name)
        selected = gr.Tabs(selected="compare") if model_status and not slots["policy"].error else gr.Tabs()
        return policy_box, reference_box, model_status or gr.Markdown(), run_status, selected

    outputs = [models.boxes["policy"], models.boxes["reference"], models.status, status, tabs]
    load.click(load_policy, pick, outputs)
