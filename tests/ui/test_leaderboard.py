"""Arena leaderboard maths against hand-worked numbers: Bradley-Terry on the Elo scale, ties as half a win."""

from __future__ import annotations

import math

import pytest

from tandemlm.ui.votes.leaderboard import (
    Battle,
    battles_from_records,
    bootstrap_intervals,
    bradley_terry,
    standings,
    win_rates,
)

HALF_GAP_3_TO_1 = 200 * math.log10(3)  # a 3:1 record puts the two models 400·log10(3) apart, centred on 1000


def _battles(a: str, b: str, wins: int, ties: int, losses: int) -> list[Battle]:
    return [Battle(a, b, 1.0)] * wins + [Battle(a, b, 0.5)] * ties + [Battle(b, a, 1.0)] * losses


def test_two_models_with_a_3_to_1_record_sit_400_log10_3_apart():
    ratings = bradley_terry(_battles("A", "B", 3, 0, 1))
    assert ratings["A"] == pytest.approx(1000 + HALF_GAP_3_TO_1, abs=1e-6)  # 1095.42
    assert ratings["B"] == pytest.approx(1000 - HALF_GAP_3_TO_1, abs=1e-6)
    assert win_rates(_battles("A", "B", 3, 0, 1)) == {("A", "B"): 0.75, ("B", "A"): 0.25}


def test_ties_count_as_half_a_win_each():
    battles = _battles("A", "B", 2, 2, 0)  # A: 2 + 2·0.5 = 3, B: 2·0.5 = 1, the 3:1 record again
    assert bradley_terry(battles)["A"] == pytest.approx(1000 + HALF_GAP_3_TO_1, abs=1e-6)
    assert win_rates(battles)[("A", "B")] == 0.75


def test_three_models_whose_record_fits_strengths_4_2_1_exactly():
    # A-B 2:1, B-C 2:1, A-C 4:1 is what strengths 4, 2, 1 predict, so those are the maximum-likelihood fit.
    battles = _battles("A", "B", 2, 0, 1) + _battles("B", "C", 2, 0, 1) + _battles("A", "C", 4, 0, 1)
    ratings = bradley_terry(battles)
    gap = 400 * math.log10(2)  # 120.41
    assert ratings == pytest.approx({"A": 1000 + gap, "B": 1000.0, "C": 1000 - gap}, abs=1e-6)


def test_an_unbeaten_model_needs_the_prior_of_one_virtual_tie_per_pair():
    battles = _battles("A", "B", 2, 0, 0)
    with pytest.raises(ValueError, match="ratings of A, B are infinite"):
        bradley_terry(battles)
    ratings = bradley_terry(battles, prior=1.0)  # 2.5 : 0.5
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(5), abs=1e-6)
    assert bradley_terry(_battles("A", "B", 3, 0, 1), prior=1.0)["A"] == pytest.approx(1000 + 200 * math.log10(7 / 3), abs=1e-6)


def test_votes_file_records_become_battles_left_against_right():
    records = [
        {"label": "left", "left": {"model": "run"}, "right": {"model": "base"}},
        {"label": "right", "left": {"model": "base"}, "right": {"model": "run"}},
        {"label": "both_bad", "left": {"model": "run"}, "right": {"model": "base"}},
        {"label": "tie", "left": {"model": "run"}, "right": {"model": "run"}},  # a model against itself: no battle
        {"label": "left", "left": {"model": "run"}},  # damaged
    ]
    assert battles_from_records(records) == [Battle("run", "base", 1.0), Battle("base", "run", 0.0), Battle("run", "base", 0.5)]


def test_standings_count_each_models_record_and_bracket_its_rating():
    battles = _battles("A", "B", 6, 2, 2)
    board = standings(battles, rounds=50, seed=1)
    assert [(s.model, s.battles, s.wins, s.ties, s.losses) for s in board] == [("A", 10, 6, 2, 2), ("B", 10, 2, 2, 6)]
    for row in board:
        assert row.low <= row.rating <= row.high and row.high - row.low > 10
    assert bootstrap_intervals(battles, rounds=20, seed=3) == bootstrap_intervals(battles, rounds=20, seed=3)
    assert standings([]) == []
