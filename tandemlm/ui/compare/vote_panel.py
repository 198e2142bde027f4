"""The vote buttons under a comparison, the optional edit of the better answer, the votes file line, and the export.

:func:`record_vote`, :func:`vote_event` and :func:`export_votes` are the handlers (no browser needed to
test them); the records themselves are built and appended by :mod:`tandemlm.ui.votes.records`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tandemlm.ui.compare.outputs import Comparison, keeping
from tandemlm.ui.votes.records import Label, append_record, preference_record, read_pairs, read_records

if TYPE_CHECKING:
    import gradio as gr

BUTTONS: dict[str, str] = {"left": "← Left is better", "right": "Right is better →", "tie": "Tie", "both_bad": "Both bad"}


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


class VoteOutputs(NamedTuple):
    """What a vote updates: its status, the comparison (now voted), a blind battle's reveal, the votes file line."""

    vote_status: Any
    comparison: Any
    left_stats: Any  # a blind battle only: the stats lines with the names, once voted
    right_stats: Any
    left_divergence: Any  # a blind battle only: the divergence, once voted
    right_divergence: Any
    votes_info: Any


@dataclass
class VotePanel:
    """The panel's components the tab clears when a new comparison starts, and the vote events."""

    edit: gr.Textbox
    status: gr.Markdown
    events: list[Any]  # one per vote button: the tab chains the leaderboard refresh on them


def votes_summary(votes_path: str) -> str:
    """The votes file's absolute path and how many records are DPO pairs (ties and both-bad are not)."""
    path = Path(votes_path).expanduser().resolve()
    if not path.is_file():
        return f"Votes go to `{path}` (none yet). Each left/right vote is a DPO pair: `tandem align dpo --dataset {path}`."
    total, pairs = sum(1 for _ in read_records(path)), len(read_pairs(path))
    return (
        f"Votes: `{path}`: {total} votes, **{pairs} usable DPO pairs** (ties and both-bad are not pairs); "
        f"train on them with the button below or `tandem align dpo --dataset {path}`."
    )


def vote_event(votes_path: str, comparison: Comparison | None, edited: str, label: Label, scale: float = 2.0) -> VoteOutputs:
    """A vote button: records the vote and, in a blind battle, shows who answered and the divergence at ``scale``."""
    status, comparison = record_vote(votes_path, comparison, label, edited or "")
    shown: dict[str, Any] = {}
    if comparison is not None and comparison.voted and comparison.reveal:
        shown["left_stats"], shown["right_stats"] = comparison.reveal
        shown["left_divergence"], shown["right_divergence"] = comparison.divergence(float(scale))
    return keeping(VoteOutputs, vote_status=status, comparison=comparison, votes_info=votes_summary(votes_path), **shown)


def build_vote_panel(
    comparison: gr.State,
    votes_path: str,
    stats: Mapping[str, gr.Markdown],
    divergence: Mapping[str, gr.HTML],
    scale: gr.Slider | None = None,
) -> VotePanel:
    """Vote buttons, the edit box, the votes file line, and export; call inside the Compare tab.

    ``stats`` and ``divergence`` (by side) get a blind battle's names and divergence (at the colour
    ``scale``) once it is voted on.
    """
    import gradio as gr

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
    outputs = VoteOutputs(
        vote_status=vote_status, comparison=comparison, left_stats=stats["left"], right_stats=stats["right"],
        left_divergence=divergence["left"], right_divergence=divergence["right"], votes_info=votes_info,
    )
    events = [
        button.click(
            lambda state, text, value=2.0, label=label: vote_event(votes_path, state, text, label, value),
            [comparison, edit, *([scale] if scale is not None else [])],
            list(outputs),
            concurrency_limit=None,
        )
        for label, button in buttons.items()
    ]
    from_left.click(lambda state: state.left.response if state else "", comparison, edit, queue=False)
    from_right.click(lambda state: state.right.response if state else "", comparison, edit, queue=False)
    export.click(lambda: export_votes(votes_path), outputs=[download, vote_status])
    return VotePanel(edit, vote_status, events)
