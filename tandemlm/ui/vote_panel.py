"""The vote buttons under a comparison, the optional edit of the better answer, and the export.

:func:`record_vote` and :func:`export_votes` are the handlers (no Gradio needed to test them);
the records themselves are built and appended by :mod:`tandemlm.ui.votes`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.deploy.types import SamplingParams
from tandemlm.models.chat_template import Message
from tandemlm.ui.scoring import HIDDEN, ScoredAnswer
from tandemlm.ui.votes import Label, Side, append_record, preference_record

if TYPE_CHECKING:
    import gradio as gr

BUTTONS: dict[str, str] = {"left": "← Left is better", "right": "Right is better →", "tie": "Tie", "both_bad": "Both bad"}


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


def record_vote(votes_path: str, comparison: Comparison | None, label: Label, edited: str = "") -> tuple[str, Comparison | None]:
    """Appends the vote; returns (status line, comparison marked as voted). Never raises."""
    if comparison is None:
        return "Nothing to vote on yet: run a comparison first.", comparison
    if comparison.voted:
        return f"Already recorded ({comparison.voted}) for this comparison; run a new one to vote again.", comparison
    if label in ("left", "right") and not getattr(comparison, label).response.strip() and not edited.strip():
        return f"The {label} answer is empty; edit it below or vote tie / both bad.", comparison
    record = preference_record(comparison.prompt, comparison.left, comparison.right, label, comparison.params, edited)
    try:
        append_record(votes_path, record)
    except OSError as exc:
        return f"⚠ could not write {votes_path}: {exc.strerror or exc}", comparison
    comparison.voted = label
    edited_note = " (edited answer as chosen)" if record["edited"] else ""
    status = f"Recorded **{label.replace('_', ' ')}**{edited_note} in `{votes_path}`."
    if comparison.reveal is not None:
        left, right = comparison.roles
        status += f" Left was the **{left}** (`{comparison.left.model}`), right the **{right}** (`{comparison.right.model}`)."
    return status, comparison


def export_votes(votes_path: str) -> tuple[str | None, str]:
    """A snapshot copy of the votes file to download; returns (path or None, status line)."""
    source = Path(votes_path)
    if not source.is_file():
        return None, f"No votes yet (`{votes_path}` does not exist)."
    # A copy in a temp folder: Gradio serves files from there, and the download cannot tear mid-append.
    target = Path(tempfile.mkdtemp(prefix="tandem-votes-")) / source.name
    shutil.copyfile(source, target)
    lines = sum(1 for line in target.read_text(encoding="utf-8").splitlines() if line.strip())
    return str(target), f"{lines} records exported."


def build_vote_panel(
    comparison: gr.State, votes_path: str, reveal: list[gr.components.Component], scale: gr.Slider | None = None
) -> tuple[list[gr.components.Component], list[Any]]:
    """Vote buttons, the edit box, the votes file line, and export; call inside the Compare tab.

    ``reveal`` (left stats, right stats, left divergence, right divergence) get a blind battle's
    names and divergence (at the colour ``scale``) once it is voted on. Returns the edit box and vote status (for the tab to
    clear when a new comparison starts) and the vote events (to chain the leaderboard refresh on).
    """
    import gradio as gr

    from tandemlm.ui.arena import votes_summary

    with gr.Row():
        buttons = {label: gr.Button(text, elem_id=f"vote-{label}") for label, text in BUTTONS.items()}
    with gr.Accordion("Edit the better answer before voting (optional)", open=False):
        edit = gr.Textbox(label="better answer, edited (used as chosen)", lines=4, elem_id="vote-edit")
        with gr.Row():
            from_left = gr.Button("start from left answer", size="sm")
            from_right = gr.Button("start from right answer", size="sm")
    vote_status = gr.Markdown(elem_id="vote-status")
    votes_info = gr.Markdown(lambda: votes_summary(votes_path), elem_id="vote-file-info")
    with gr.Row():
        export = gr.Button("Export votes (JSONL)", size="sm", elem_id="vote-export")
        download = gr.File(label="votes file", interactive=False, height=90, elem_id="vote-file")

    def vote(state: Comparison | None, text: str, label: Label, value: float = 2.0) -> tuple[Any, ...]:
        status, state = record_vote(votes_path, state, label, text or "")
        revealed = state is not None and state.voted and state.reveal
        shown = (*state.reveal, *state.divergence(float(value))) if revealed else (gr.skip(),) * 4
        return status, state, *shown, votes_summary(votes_path)

    events = [
        button.click(
            lambda state, text, value=2.0, label=label: vote(state, text, label, value),
            [comparison, edit, *([scale] if scale is not None else [])],
            [vote_status, comparison, *reveal, votes_info],
            concurrency_limit=None,
        )
        for label, button in buttons.items()
    ]
    from_left.click(lambda state: state.left.response if state else "", comparison, edit, queue=False)
    from_right.click(lambda state: state.right.response if state else "", comparison, edit, queue=False)
    export.click(lambda: export_votes(votes_path), outputs=[download, vote_status])
    return [edit, vote_status], events
