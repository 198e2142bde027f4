"""The Compare tab's Gradio handlers: a turn, a new conversation, a redraw at another colour scale.

Each returns its outputs by name (:mod:`tandemlm.ui.compare.outputs`: the class whose fields
:func:`tandemlm.ui.compare.layout.build_compare_tab` fills with the components), ``gr.skip()`` where
an output must keep what it shows, and raises its refusals as a toast (``gr.Warning``): the status
line alone would be overwritten by the running comparison's next update at once. Plain functions,
so tests call them without a browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tandemlm.ui.compare.conversation import Conversation, RunGuard
from tandemlm.ui.compare.divergence import legend_html
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.outputs import Comparison, RedrawOutputs, TurnOutputs, keeping
from tandemlm.ui.compare.turn import compare_views
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.stopping import StopFlag

CLEARED = "New conversation: the next message starts it."
RUNNING = "A comparison is running: press Stop first, then New conversation."


def _refused(message: str) -> TurnOutputs:
    """A toast with ``message``, the status line set to it, every other output left as it is."""
    import gradio as gr

    gr.Warning(message)
    return keeping(TurnOutputs, status=message)


def turn_event(
    slots: dict[str, EngineSlot],
    judges: Judges,
    stop: StopFlag,
    guard: RunGuard,
    conversation: Conversation | None,
    blind: bool,
    unbiased_kl: bool,
    text: str,
    system: str | None,
    *sampling: Any,
) -> Iterator[TurnOutputs]:
    """Compare (click or Enter): the next turn of the conversation, or a refusal while one runs.

    ``unbiased_kl`` (its checkbox) samples both sides at T=1, top-p 1, top-k off instead of the sliders' values.
    """
    views = compare_views(
        slots, judges, text, system, *sampling,
        stop=stop, blind=blind, conversation=conversation, guard=guard, unbiased_kl=bool(unbiased_kl),
    )
    for view in views:
        if view.busy:
            yield _refused(view.status)
            return
        yield view.outputs()


def restart_event(guard: RunGuard) -> TurnOutputs:
    """New conversation: empties both panes, the divergence, the vote state and the vote status.

    Refused while a comparison runs: its next update would fill the panes again.
    """
    if guard.running:
        return _refused(RUNNING)
    return TurnOutputs(
        left_bot=[], right_bot=[], left_stats="", right_stats="", left_divergence="", right_divergence="",
        comparison=None, status=CLEARED, conversation=None, prompt="", vote_status="",
    )


def redraw_event(comparison: Comparison | None, scale: float) -> RedrawOutputs:
    """The colour scale moved: the finished comparison's divergence and the legend, redrawn (no model runs)."""
    legend = legend_html(float(scale))
    if comparison is None:
        return keeping(RedrawOutputs, legend=legend)
    left, right = comparison.divergence(float(scale))
    return RedrawOutputs(left_divergence=left, right_divergence=right, legend=legend)
