"""The Compare tab's Gradio handlers: a turn, a new conversation, a redraw at another colour scale.

Each returns the values for the outputs :func:`tandemlm.ui.compare_layout.build_compare_tab` wires
(``gr.skip()`` where an output must keep what it shows) and raises its refusals as a toast
(``gr.Warning``): the status line alone would be overwritten by the running comparison's next
update at once. Plain functions, so tests call them without a browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tandemlm.ui.compare_tab import compare_views
from tandemlm.ui.conversation import Conversation, RunGuard
from tandemlm.ui.divergence import legend_html
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.judges import Judges
from tandemlm.ui.stopping import StopFlag
from tandemlm.ui.vote_panel import Comparison

TURN_OUTPUTS = 10
"""left bot, right bot, left stats, right stats, left/right divergence, comparison, status, conversation, prompt box."""
STATUS = 7  # where the status line is among them
CLEARED = "New conversation: the next message starts it."
RUNNING = "A comparison is running: press Stop first, then New conversation."


def _refused(message: str, count: int) -> tuple[Any, ...]:
    """A toast with ``message``, the status line set to it, every other output left as it is."""
    import gradio as gr

    gr.Warning(message)
    return tuple(message if index == STATUS else gr.skip() for index in range(count))


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
) -> Iterator[tuple[Any, ...]]:
    """Compare (click or Enter): the next turn of the conversation, or a refusal while one runs.

    ``unbiased_kl`` (its checkbox) samples both sides at T=1, top-p 1, top-k off instead of the sliders' values.
    """
    views = compare_views(
        slots, judges, text, system, *sampling,
        stop=stop, blind=blind, conversation=conversation, guard=guard, unbiased_kl=bool(unbiased_kl),
    )
    for view in views:
        if view.busy:
            yield _refused(view.status, TURN_OUTPUTS)
            return
        yield (*view.values(), view.conversation, view.box)


def restart_event(guard: RunGuard) -> tuple[Any, ...]:
    """New conversation: empties both panes, the divergence, the vote state and the vote status.

    Refused while a comparison runs: its next update would fill the panes again.
    """
    if guard.running:
        return _refused(RUNNING, TURN_OUTPUTS + 1)
    return [], [], "", "", "", "", None, CLEARED, None, "", ""


def redraw_event(comparison: Comparison | None, scale: float) -> tuple[Any, ...]:
    """The colour scale moved: the finished comparison's divergence and the legend, redrawn (no model runs)."""
    import gradio as gr

    shown = comparison.divergence(float(scale)) if comparison is not None else (gr.skip(), gr.skip())
    return (*shown, legend_html(float(scale)))
