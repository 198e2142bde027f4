"""Arena pieces of the Compare tab: blind side assignment, seeds, the same-model warning.

In blind mode each battle puts policy and reference on a random side and hides who answered
(names, backends, divergence) until the vote, so the vote cannot follow the name or the side.
Every side samples with a concrete seed (drawn when the user leaves it random), recorded with the vote.
The arena's leaderboard is :mod:`tandemlm.ui.compare.leaderboard_panel` (over :mod:`tandemlm.ui.votes.leaderboard`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tandemlm.errors import EngineError
from tandemlm.ui.model_refs import resolve_slot_model

if TYPE_CHECKING:
    from tandemlm.ui.engines import EngineSlot

ALIASES = {"left": "model A", "right": "model B"}
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
