"""Arena pieces of the Compare tab: blind side assignment, seeds, the same-model warning, the leaderboard view.

In blind mode each battle puts policy and reference on a random side and hides who answered
(names, backends, divergence) until the vote, so the vote cannot follow the name or the side.
Every side samples with a concrete seed (drawn when the user leaves it random), recorded with the vote.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from tandemlm.errors import EngineError
from tandemlm.ui.leaderboard import battles_from_records, standings, win_rates
from tandemlm.ui.model_refs import resolve_slot_model
from tandemlm.ui.votes import read_pairs, read_records

if TYPE_CHECKING:
    from tandemlm.ui.engines import EngineSlot

ALIASES = {"left": "model A", "right": "model B"}
LEADERBOARD_HEADERS = ["model", "rating", "95% CI", "battles", "wins", "ties", "losses"]
PAIR_HEADERS = ["model", "against", "win rate", "battles"]
SEED_LIMIT = 2**31 - 1


def assign_sides(blind: bool, rng: random.Random | None = None) -> dict[str, str]:
    """Which slot answers on which side: policy left unless ``blind``, then a coin flip per battle."""
    if blind and (rng or random.SystemRandom()).random() < 0.5:
        return {"left": "reference", "right": "policy"}
    return {"left": "policy", "right": "reference"}


def side_seeds(seed: int | None, rng: random.Random | None = None) -> dict[str, int]:
    """The seed each side samples with: the user's (both sides), or one drawn per side when left random."""
    if seed is not None:
        return {"left": seed, "right": seed}
    draw = rng or random.SystemRandom()
    return {"left": draw.randrange(SEED_LIMIT), "right": draw.randrange(SEED_LIMIT)}


def same_model_note(slots: dict[str, EngineSlot]) -> str:
    """A warning when policy and reference are one model (divergence is then 0 by construction), else ''."""
    policy, reference = slots["policy"], slots["reference"]
    if policy.backend != reference.backend:
        return ""
    try:
        same = resolve_slot_model(policy.model) == resolve_slot_model(reference.model)
    except (EngineError, OSError, ValueError):
        same = policy.model == reference.model
    if not same:
        return ""
    return (
        f"⚠ policy and reference are the same model (`{policy.model}`): answers differ only by sampling and "
        "the divergence is 0. Pick a trained run (Runs → Compare with base) or another reference above."
    )


def votes_summary(votes_path: str) -> str:
    """The votes file's absolute path and how many records are DPO pairs (ties and both-bad are not)."""
    from pathlib import Path

    path = Path(votes_path).expanduser().resolve()
    if not path.is_file():
        return f"Votes go to `{path}` (none yet). Each left/right vote is a DPO pair: `tandem align dpo --dataset {path}`."
    total, pairs = sum(1 for _ in read_records(path)), len(read_pairs(path))
    return (
        f"Votes: `{path}`: {total} votes, **{pairs} usable DPO pairs** (ties and both-bad are not pairs); "
        f"train on them with the button below or `tandem align dpo --dataset {path}`."
    )


def leaderboard_tables(votes_path: str, rounds: int = 100) -> tuple[list[list[Any]], list[list[Any]], str]:
    """(ratings rows, pairwise win-rate rows, one-line note) for the votes file; never raises."""
    try:
        battles = battles_from_records(read_records(votes_path))
    except OSError:
        battles = []
    if not battles:
        return [], [], "No battles yet: vote on a comparison to start the leaderboard."
    rows = [
        [s.model, round(s.rating, 1), f"{s.low:.0f} – {s.high:.0f}", s.battles, s.wins, s.ties, s.losses]
        for s in standings(battles, rounds=rounds)
    ]
    counts: dict[tuple[str, str], int] = {}
    for battle in battles:
        for pair in ((battle.model_a, battle.model_b), (battle.model_b, battle.model_a)):
            counts[pair] = counts.get(pair, 0) + 1
    pairs = [[a, b, f"{rate:.0%}", counts[(a, b)]] for (a, b), rate in sorted(win_rates(battles).items())]
    note = (
        f"{len(battles)} battles. Bradley-Terry ratings on the Elo scale (mean 1000, one virtual tie per pair), "
        f"95% intervals from {rounds} bootstrap refits; ties and both-bad count as half a win each."
    )
    return rows, pairs, note


def build_leaderboard(votes_path: str) -> tuple[Any, list[Any]]:
    """The leaderboard accordion (ratings, pairwise win rates, refresh); returns (refresh handler, its outputs)."""
    import gradio as gr

    def refresh() -> tuple[Any, ...]:
        return leaderboard_tables(votes_path)

    with gr.Accordion("Leaderboard (from the votes file)", open=False):
        board = gr.Dataframe(headers=LEADERBOARD_HEADERS, value=lambda: refresh()[0], interactive=False, elem_id="leaderboard")
        pairs = gr.Dataframe(headers=PAIR_HEADERS, value=lambda: refresh()[1], interactive=False, label="win rate per pair")
        with gr.Row():
            note = gr.Markdown(lambda: refresh()[2], elem_id="leaderboard-note")
            button = gr.Button("Refresh leaderboard", size="sm", scale=0, min_width=160)
    outputs = [board, pairs, note]
    button.click(refresh, outputs=outputs)
    return refresh, outputs
