"""What the Compare tab's layout and its logic share: the events' outputs by name, and the finished turn.

An event's outputs are a NamedTuple. The layout fills one with the Gradio components, and
``list(outputs)`` is the event's ``outputs=`` (the field order is set here and nowhere else); the
handlers return the same class filled with values, which Gradio reads as the tuple it is. So the
layout and the handlers agree by field name, never by position. :func:`keeping` gives every output
a handler does not set Gradio's ``skip()``: it keeps what it shows.

:class:`Comparison` is the finished turn held in a ``gr.State``: the turn logic makes it, the vote
panel records it. No Gradio at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from tandemlm.deploy.types import SamplingParams
from tandemlm.models.chat_template import Message
from tandemlm.ui.compare.divergence_scoring import HIDDEN, ScoredAnswer
from tandemlm.ui.votes.records import Side

Outputs = TypeVar("Outputs", bound=tuple)


class TurnOutputs(NamedTuple):
    """What a turn (Compare, or Enter in the prompt box) and New conversation update."""

    left_bot: Any
    right_bot: Any
    left_stats: Any  # who answered, length, speed, judges (a blind battle: "model A" until the vote)
    right_stats: Any
    left_divergence: Any  # the answer coloured by log π/π_ref
    right_divergence: Any
    comparison: Any  # gr.State: the finished turn to vote on (a Comparison), or None
    status: Any
    conversation: Any  # gr.State: the Conversation so far (None: the next message starts one)
    prompt: Any  # the prompt box: emptied once the turn joins the conversation, kept to resend otherwise
    vote_status: Any  # the vote panel's line: New conversation clears it, a turn keeps it


class RedrawOutputs(NamedTuple):
    """What moving the colour scale redraws (no model runs)."""

    left_divergence: Any
    right_divergence: Any
    legend: Any


def keeping(outputs: type[Outputs], **values: Any) -> Outputs:
    """``outputs`` with ``values`` by field name; every other output keeps what it shows (``gr.skip()``)."""
    import gradio as gr

    kept = {name: gr.skip() for name in outputs._fields}  # type: ignore[attr-defined]
    return outputs(**{**kept, **values})  # an unknown name raises TypeError


@dataclass
class Comparison:
    """A finished turn of a comparison waiting for a vote.

    ``prompt`` is the left side's conversation up to this turn; each side's own is in its
    ``context`` (the two differ from the second turn on: each saw its own earlier replies).
    """

    prompt: list[Message]
    left: Side
    right: Side
    params: SamplingParams
    voted: str | None = None
    roles: tuple[str, str] = ("policy", "reference")  # which slot answered left and right
    reveal: tuple[str, str] | None = None  # blind battle: the named stats lines to show after the vote
    scores: dict[str, ScoredAnswer] = field(default_factory=dict)  # side -> its answer scored under both models
    blind: bool = False

    def divergence(self, scale: float = 2.0) -> tuple[str, str]:
        """Left and right divergence views at ``scale`` (hidden in a blind battle until the vote)."""
        if self.blind and not self.voted:
            return HIDDEN, HIDDEN
        left, right = (self.scores[key].html(scale) if key in self.scores else "" for key in ("left", "right"))
        return left, right
