"""Runs tab: alignment runs under the runs folder, their plots and metrics, "Load policy into Compare"
and "Compare with base" (a LoRA run: one base engine, adapter on for the policy, off for the reference),
and "Compare runs": the ticked runs' outcomes in one table and figure (``align.compare``, as the CLI's)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.compare import FIGURE_FILE, HEADERS, table_note, table_rows, write_figure
from tandemlm.models.builtin import BUILTIN_MODELS
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.model_refs import lora_run, run_base
from tandemlm.ui.models_panel import ModelsPanel, load_slot
from tandemlm.ui.runs import compare_rows, find_policy, list_runs, metrics_summary, read_run, run_info

if TYPE_CHECKING:
    import gradio as gr

SUMMARY_HEADERS = ["metric", "first", "last", "min", "max"]


def run_names(runs_dir: str) -> list[str]:
    """Names of the runs under ``runs_dir``, newest first."""
    return [run.name for run in list_runs(runs_dir)]


def policy_line(path: Path) -> str:
    """What the run offers as a policy: a LoRA adapter on its base, a model file or folder, or nothing yet."""
    run = lora_run(path)
    if run is not None:
        base = run_base(path)
        on = f"on `{base}`" if base else "(its base model is gone)"
        return f"policy: LoRA adapter `{run.final}` {on}, served on the base without merging"
    policy = find_policy(path)
    return f"policy: `{policy}`" if policy else "no policy saved yet (no final/, merged/, policy/ or policy.gguf)"


def show_run(runs_dir: str, name: str | None) -> tuple[list[tuple[str, str]], list[list[Any]], str, str]:
    """(plots with captions, metrics summary rows, config.yaml text, status line) for one run."""
    if not name:
        count = len(run_names(runs_dir))
        return [], [], "", f"{count} runs in `{runs_dir}`." if count else f"No runs in `{runs_dir}` yet."
    path = Path(runs_dir) / name
    if not path.is_dir():
        return [], [], "", f"⚠ run `{name}` is gone from `{runs_dir}`."
    run = read_run(path)
    status = f"`{run.name}`: {len(run.metrics)} logged steps, {len(run.plots)} plots, {policy_line(path)}."
    return [(str(p), p.stem) for p in run.plots], metrics_summary(run.metrics), run.config_text, status


def compare_runs(runs_dir: str, names: list[str] | None) -> tuple[list[list[str]], str | None, str]:
    """(table rows under ``compare.HEADERS``, the figure's path, status line) for the ticked runs.

    A ticked folder that is not a run is named in the status and left out; nothing is raised.
    """
    if not names:
        return [], None, "Tick the runs to compare."
    rows, problems = compare_rows(runs_dir, names)
    figure = None
    if rows:
        # A fresh temp folder per comparison: Gradio serves files from there, and two clicks never share one.
        figure = str(write_figure(rows, Path(tempfile.mkdtemp(prefix="tandem-compare-")) / FIGURE_FILE))
    lines = [f"{len(rows)} of {len(names)} runs compared.", table_note(rows), *(f"⚠ {p}" for p in problems)]
    return table_rows(rows), figure, "  \n".join(line for line in lines if line)


def load_run_policy(
    slots: dict[str, EngineSlot], runs_dir: str, name: str | None, with_base: bool = True
) -> tuple[str, str, str, str]:
    """Makes the run's policy the policy slot and, ``with_base``, its base model (if still there) the reference.

    A LoRA run's policy is its base with the adapter on and its reference the same base with the
    adapter off, in one engine. Returns (policy box, reference box, models status, run status);
    a load error is shown, not raised.
    """
    boxes = slots["policy"].model, slots["reference"].model
    if not name:
        return *boxes, "", "Pick a run first."
    path = Path(runs_dir) / name
    if lora_run(path) is None and find_policy(path) is None:
        return *boxes, "", f"⚠ run `{name}` has no policy to load yet: {policy_line(path)}."
    base = run_base(path) or str(run_info(path).get("base_model") or "")
    with_base = with_base and bool(base) and (base in BUILTIN_MODELS or Path(base).exists())
    # The policy loads first: for a LoRA run that opens the base's engine with the adapter in it,
    # which vLLM needs at load (it switches LoRA on then or never); the reference then shares it.
    status = load_slot(slots, "policy", str(path), "auto")
    error = slots["policy"].problem  # a failed policy keeps the old one, so the reference stays too
    if with_base and not error:
        status = load_slot(slots, "reference", base, "auto")
    where = " (its base model as the reference" + (", adapter off)" if lora_run(path) else ")")
    note = f"⚠ {error}" if error else f"Loaded `{name}` as the policy" + (where if with_base else "")
    return slots["policy"].model, slots["reference"].model, status, note


def build_runs_tab(slots: dict[str, EngineSlot], runs_dir: str, models: ModelsPanel, tabs: gr.Tabs) -> None:
    """Lays out the Runs tab; ``models`` and ``tabs`` are updated when a run's policy is loaded."""
    import gradio as gr

    with gr.Row():
        pick = gr.Dropdown(run_names(runs_dir), value=None, label=f"run (in {runs_dir})", scale=4, elem_id="runs-pick")
        refresh = gr.Button("Refresh", scale=0, min_width=90)
        load = gr.Button("Load policy into Compare", scale=1, elem_id="runs-load")
        with_base = gr.Button("Compare with base", variant="primary", scale=1, elem_id="runs-compare-base")
    status = gr.Markdown(show_run(runs_dir, None)[3], elem_id="runs-status")
    # Plots are drawn whole (contain, not the gallery's square crop), two to a row even when there is
    # one; the table gets the full width and wraps, so a 1024 px screen shows every column.
    plots = gr.Gallery(
        label="plots", columns=2, height=340, object_fit="contain", fit_columns=False, format="png",
        elem_id="runs-plots",
    )
    summary = gr.Dataframe(
        headers=SUMMARY_HEADERS, label="metrics (metrics.jsonl)", interactive=False, wrap=True, max_height=420,
        elem_id="runs-metrics",
    )
    with gr.Accordion("config.yaml", open=False):
        config = gr.Code(language="yaml", interactive=False, show_label=False)
    ticked = _build_compare(runs_dir)

    def refreshed() -> tuple[Any, Any]:
        names = run_names(runs_dir)
        return gr.Dropdown(choices=names), gr.CheckboxGroup(choices=names)

    refresh.click(refreshed, outputs=[pick, ticked], queue=False)
    pick.change(lambda name: show_run(runs_dir, name), pick, [plots, summary, config, status])

    def load_policy(name: str | None, base: bool = False) -> tuple[Any, ...]:
        policy_box, reference_box, model_status, run_status = load_run_policy(slots, runs_dir, name, with_base=base)
        selected = gr.Tabs(selected="compare") if model_status and not slots["policy"].problem else gr.Tabs()
        backends = slots["policy"].backend, slots["reference"].backend  # a run loads with auto: the dropdowns follow
        return policy_box, reference_box, *backends, model_status or gr.Markdown(), run_status, selected

    boxes = [models.boxes["policy"], models.boxes["reference"], models.backends["policy"], models.backends["reference"]]
    outputs = [*boxes, models.status, status, tabs]
    load.click(load_policy, pick, outputs)
    with_base.click(lambda name: load_policy(name, base=True), pick, outputs)


def _build_compare(runs_dir: str) -> gr.CheckboxGroup:
    """The "Compare runs" section: tick runs, get one table and the score/frontier figure; returns the ticks."""
    import gradio as gr

    with gr.Accordion("Compare runs", open=False):
        with gr.Row():
            ticked = gr.CheckboxGroup(run_names(runs_dir), label="runs to compare", scale=4, elem_id="runs-compare-pick")
            button = gr.Button("Compare runs", scale=1, elem_id="runs-compare")
        status = gr.Markdown(elem_id="runs-compare-status")
        table = gr.Dataframe(
            headers=HEADERS, label="runs side by side", interactive=False, wrap=True, elem_id="runs-compare-table"
        )
        figure = gr.Image(
            type="filepath", format="png", label="(a) score against samples, (b) reward–KL frontier",
            interactive=False, elem_id="runs-compare-figure",
        )
    button.click(lambda names: compare_runs(runs_dir, names), ticked, [table, figure, status])
    return ticked
