"""The arena leaderboard over the votes file: Bradley-Terry ratings, bootstrap intervals, pairwise win rates.

Each vote is a battle between the left and the right model: a left vote scores 1 for left, a right
vote 0, and a tie or "both bad" 0.5 (as FastChat's arena analysis counts ties: half a win each).
The Bradley-Terry model says ``P(i beats j) = p_i / (p_i + p_j)``; its maximum-likelihood strengths
(the logistic regression FastChat fits) are found with Hunter's MM iteration

    p_i ← W_i / Σ_j N_ij / (p_i + p_j)        (W_i: i's score, N_ij: battles of i and j)

and reported on the Elo scale, ``rating_i = 1000 + 400·log10 p_i`` with the log-strengths centred,
so two models with a 3:1 record sit ``400·log10 3 ≈ 191`` points apart. A model that never lost has
no finite maximum; ``prior`` adds that many virtual ties to every pair that met, which keeps every
rating finite (the app uses 1). The 95% interval comes from refitting on battles resampled with
replacement. Pure functions over numbers; numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SCORES = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}
SCALE, CENTRE = 400.0, 1000.0


@dataclass(frozen=True)
class Battle:
    """One vote: ``score`` is model_a's (1 win, 0.5 tie or both bad, 0 loss)."""

    model_a: str
    model_b: str
    score: float


@dataclass(frozen=True)
class Standing:
    """One leaderboard row."""

    model: str
    rating: float
    low: float
    high: float
    battles: int
    wins: int
    ties: int
    losses: int


def battles_from_records(records: Iterable[dict[str, Any]]) -> list[Battle]:
    """Battles from preference records (``records``); a record without both model names, or a model against itself, is skipped."""
    battles = []
    for record in records:
        left, right = record.get("left") or {}, record.get("right") or {}
        a, b, label = left.get("model"), right.get("model"), record.get("label")
        if isinstance(a, str) and isinstance(b, str) and a and b and a != b and label in SCORES:
            battles.append(Battle(a, b, SCORES[label]))
    return battles


def pair_records(battles: Sequence[Battle]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """``(a, b) -> (a's wins, ties, b's wins)`` for each pair that met, with ``a < b``."""
    table: dict[tuple[str, str], list[int]] = {}
    for battle in battles:
        a, b, score = battle.model_a, battle.model_b, battle.score
        if a > b:
            a, b, score = b, a, 1.0 - score
        row = table.setdefault((a, b), [0, 0, 0])
        row[0 if score == 1.0 else 2 if score == 0.0 else 1] += 1
    return {pair: (row[0], row[1], row[2]) for pair, row in table.items()}


def win_rates(battles: Sequence[Battle]) -> dict[tuple[str, str], float]:
    """``(a, b) -> share of a's battles against b that a won`` (ties half), both orders."""
    rates = {}
    for (a, b), (wins, ties, losses) in pair_records(battles).items():
        rate = (wins + 0.5 * ties) / (wins + ties + losses)
        rates[(a, b)], rates[(b, a)] = rate, 1.0 - rate
    return rates


def bradley_terry(battles: Sequence[Battle], prior: float = 0.0, tol: float = 1e-10, max_iter: int = 100_000) -> dict[str, float]:
    """Elo-scaled Bradley-Terry ratings (mean 1000); ValueError when a model's rating is infinite (``prior`` 0 and it never lost or never won)."""
    import numpy as np

    models = sorted({b.model_a for b in battles} | {b.model_b for b in battles})
    index = {m: i for i, m in enumerate(models)}
    games, score = np.zeros((len(models), len(models))), np.zeros(len(models))
    for b in battles:
        i, j = index[b.model_a], index[b.model_b]
        games[i, j] += 1
        games[j, i] += 1
        score[i] += b.score
        score[j] += 1.0 - b.score
    met = games > 0
    games += prior * met
    score += 0.5 * prior * met.sum(axis=1)
    played = games.sum(axis=1)
    if np.any(score <= 0) or np.any(score >= played):
        extreme = [m for m, s, n in zip(models, score, played, strict=True) if s <= 0 or s >= n]
        raise ValueError(f"ratings of {', '.join(extreme)} are infinite (never lost or never won); use prior > 0")
    strength = np.ones(len(models))
    for _ in range(max_iter):
        updated = score / (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated /= np.exp(np.log(updated).mean())  # fix the scale: geometric mean 1
        done = np.max(np.abs(updated - strength)) < tol
        strength = updated
        if done:
            break
    return {m: CENTRE + SCALE * math.log10(float(p)) for m, p in zip(models, strength, strict=True)}


def bootstrap_intervals(
    battles: Sequence[Battle], rounds: int = 100, prior: float = 1.0, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """``model -> (low, high)`` of its rating over ``rounds`` refits on battles resampled with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        picked = [battles[i] for i in rng.integers(0, len(battles), len(battles))]
        for model, rating in bradley_terry(picked, prior=prior).items():
            samples.setdefault(model, []).append(rating)
    tail = (1.0 - level) / 2 * 100
    return {m: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for m, v in samples.items()}


def standings(battles: Sequence[Battle], rounds: int = 100, prior: float = 1.0, seed: int = 0) -> list[Standing]:
    """Leaderboard rows, best rating first (empty without battles)."""
    if not battles:
        return []
    ratings = bradley_terry(battles, prior=prior)
    intervals = bootstrap_intervals(battles, rounds, prior, seed) if rounds else {}
    counts = {m: [0, 0, 0] for m in ratings}
    for (a, b), (wins, ties, losses) in pair_records(battles).items():
        for model, won, lost in ((a, wins, losses), (b, losses, wins)):
            counts[model][0] += won
            counts[model][1] += ties
            counts[model][2] += lost
    rows = [
        Standing(m, r, *intervals.get(m, (r, r)), sum(counts[m]), *counts[m])
        for m, r in ratings.items()
    ]
    return sorted(rows, key=lambda s: s.rating, reverse=True)
