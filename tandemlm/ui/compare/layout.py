"""The Compare tab's layout: prompt row, two conversations, divergence, votes, leaderboard, training.

Wires :mod:`tandemlm.ui.compare.events`' handlers (which run turns through
:mod:`tandemlm.ui.compare.turn`) to the components laid out here, each event's outputs named by a
class of :mod:`tandemlm.ui.compare.outputs`; nothing runs at build time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from tandemlm.ui.compare.arena import same_model_note
from tandemlm.ui.compare.conversation import SIDE_KEYS, RunGuard
from tandemlm.ui.compare.divergence import legend_html
from tandemlm.ui.compare.events import redraw_event, restart_event, turn_event
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.leaderboard_panel import build_leaderboard
from tandemlm.ui.compare.outputs import RedrawOutputs, TurnOutputs
from tandemlm.ui.compare.training_panel import build_training_panel
from tandemlm.ui.compare.vote_panel import build_vote_panel
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.sampling_controls import sampling_controls
from tandemlm.ui.stopping import StopFlag

if TYPE_CHECKING:
    import gradio as gr

    from tandemlm.ui.models_panel import ModelsPanel


class Panes(NamedTuple):
    """The two conversations with their stats and divergence (by side), the colour key and its scale slider."""

    bots: dict[str, gr.Chatbot]
    stats: dict[str, gr.Markdown]
    divergence: dict[str, gr.HTML]
    legend: gr.HTML
    scale: gr.Slider


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
    panes = _panes()
    comparison, conversation = gr.State(None), gr.State(None)
    flag, guard = gr.State(StopFlag), gr.State(RunGuard)  # callables: one of each per browser session
    vote = build_vote_panel(comparison, votes_path, panes.stats, panes.divergence, panes.scale)
    build_leaderboard(votes_path, refresh_after=vote.events)
    if models is not None:
        build_training_panel(slots, votes_path, runs_dir, models)
    shown = TurnOutputs(
        left_bot=panes.bots["left"], right_bot=panes.bots["right"],
        left_stats=panes.stats["left"], right_stats=panes.stats["right"],
        left_divergence=panes.divergence["left"], right_divergence=panes.divergence["right"],
        comparison=comparison, status=status, conversation=conversation, prompt=prompt, vote_status=vote.status,
    )
    redrawn = RedrawOutputs(
        left_divergence=panes.divergence["left"], right_divergence=panes.divergence["right"], legend=panes.legend
    )

    def turn(*inputs: Any) -> Iterator[TurnOutputs]:
        yield from turn_event(slots, judges, *inputs)

    for trigger in (run.click, prompt.submit):
        trigger(turn, [flag, guard, conversation, blind, unbiased_kl, prompt, system, *controls], list(shown),
                show_progress="hidden", concurrency_limit=8)
        trigger(lambda: {vote.edit: "", vote.status: "", note: same_model_note(slots)},
                outputs=[vote.edit, vote.status, note], queue=False)
    stop.click(lambda stop_flag: stop_flag.stop(), flag, None, queue=False)
    clear.click(restart_event, guard, list(shown), queue=False)
    panes.scale.change(redraw_event, [comparison, panes.scale], list(redrawn), queue=False, show_progress="hidden")


def _panes() -> Panes:
    """Lays out the two conversations with their stats and divergence, the colour key and its scale slider."""
    import gradio as gr

    bots, stats, divergence = {}, {}, {}
    with gr.Row(equal_height=False):
        for key in SIDE_KEYS:
            with gr.Column():
                bots[key] = gr.Chatbot(label=f"{key} side", height=300, elem_id=f"compare-{key}-bot", buttons=["copy"])
                stats[key] = gr.Markdown(elem_id=f"compare-{key}-stats")
                divergence[key] = gr.HTML(elem_id=f"compare-{key}-divergence")
    with gr.Row(equal_height=False):
        legend = gr.HTML(legend_html())
        scale = gr.Slider(0.25, 8.0, value=2.0, step=0.25, label="colour scale (nats)", min_width=220, scale=0,
                          info="|log π/π_ref| that gets full colour", elem_id="compare-scale")
    return Panes(bots, stats, divergence, legend, scale)
