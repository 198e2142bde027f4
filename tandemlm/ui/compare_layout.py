"""The Compare tab's layout: prompt row, two conversations, divergence, votes, leaderboard, training.

Wires :mod:`tandemlm.ui.compare_events`' handlers (which run turns through
:mod:`tandemlm.ui.compare_tab`) to the components laid out here; nothing runs at build time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tandemlm.ui.arena import build_leaderboard, same_model_note
from tandemlm.ui.compare_events import redraw_event, restart_event, turn_event
from tandemlm.ui.compare_tab import SIDES
from tandemlm.ui.conversation import RunGuard
from tandemlm.ui.divergence import legend_html
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.judges import Judges
from tandemlm.ui.sampling import sampling_controls
from tandemlm.ui.stopping import StopFlag
from tandemlm.ui.training_panel import build_training_panel
from tandemlm.ui.vote_panel import build_vote_panel

if TYPE_CHECKING:
    from tandemlm.ui.models_panel import ModelsPanel


def build_compare_tab(
    slots: dict[str, EngineSlot], judges: Judges, votes_path: str, runs_dir: str = "runs", models: ModelsPanel | None = None
) -> None:
    """Lays out the Compare tab (prompt, two conversations, divergence, votes, leaderboard, training); call inside ``gr.Tab``."""
    import gradio as gr

    note = gr.Markdown(lambda: same_model_note(slots), elem_id="compare-same-model")
    with gr.Row():
        prompt = gr.Textbox(
            placeholder="A message to both models (Enter runs; the next one is a follow-up)", show_label=False,
            lines=1, max_lines=8, scale=6, elem_id="compare-input",
        )
        blind = gr.Checkbox(False, label="blind battle", info="sides shuffled, names hidden until the vote",
                            scale=1, min_width=140, elem_id="compare-blind")
        run = gr.Button("Compare", variant="primary", scale=1, min_width=100, elem_id="compare-run")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="compare-stop")
        clear = gr.Button("New conversation", scale=1, min_width=120, elem_id="compare-clear")
    with gr.Accordion("system prompt and sampling", open=False):
        system = gr.Textbox(label="system prompt", lines=2, placeholder="optional")
        with gr.Row():
            controls = sampling_controls("compare")
        unbiased_kl = gr.Checkbox(False, label="Unbiased KL: sample at T=1, top-p 1, top-k off", elem_id="compare-unbiased-kl",
                                  info="both sides, whatever the sliders say, so Σ log π/π_ref is an unbiased KL estimate")
    status = gr.Markdown(elem_id="compare-status")
    bots, stats, diverge, legend, scale = _panes()
    comparison, conversation = gr.State(None), gr.State(None)
    flag, guard = gr.State(StopFlag), gr.State(RunGuard)  # callables: one of each per browser session
    reveal = [stats["left"], stats["right"], diverge["left"], diverge["right"]]
    vote_outputs, vote_events = build_vote_panel(comparison, votes_path, reveal, scale)
    refresh_board, board_outputs = build_leaderboard(votes_path)
    for event in vote_events:
        event.then(refresh_board, outputs=board_outputs, show_progress="hidden")
    if models is not None:
        build_training_panel(slots, votes_path, runs_dir, models)

    def turn(*inputs: Any) -> Iterator[tuple[Any, ...]]:
        yield from turn_event(slots, judges, *inputs)

    shown = [*bots.values(), *stats.values(), *diverge.values(), comparison, status, conversation, prompt]
    for trigger in (run.click, prompt.submit):
        trigger(turn, [flag, guard, conversation, blind, unbiased_kl, prompt, system, *controls], shown,
                show_progress="hidden", concurrency_limit=8)
        trigger(lambda: ("", "", same_model_note(slots)), outputs=[*vote_outputs, note], queue=False)
    stop.click(lambda stop_flag: stop_flag.stop(), flag, None, queue=False)
    clear.click(restart_event, guard, [*shown, vote_outputs[1]], queue=False)
    scale.change(redraw_event, [comparison, scale], [*diverge.values(), legend], queue=False, show_progress="hidden")


def _panes() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any, Any]:
    """The two conversations with their stats and divergence, the colour key and its scale slider."""
    import gradio as gr

    bots, stats, diverge = {}, {}, {}
    with gr.Row(equal_height=False):
        for key in SIDES:
            with gr.Column():
                bots[key] = gr.Chatbot(label=f"{key} side", height=300, elem_id=f"compare-{key}-bot", buttons=["copy"])
                stats[key] = gr.Markdown(elem_id=f"compare-{key}-stats")
                diverge[key] = gr.HTML(elem_id=f"compare-{key}-divergence")
    with gr.Row(equal_height=False):
        legend = gr.HTML(legend_html())
        scale = gr.Slider(0.25, 8.0, value=2.0, step=0.25, label="colour scale (nats)", min_width=220, scale=0,
                          info="|log π/π_ref| that gets full colour", elem_id="compare-scale")
    return bots, stats, diverge, legend, scale
