"""Blind battles, seeds on record, the same-model warning, the leaderboard view over the votes file."""

from __future__ import annotations

import json
import random

from tandemlm.ui.arena import leaderboard_tables, same_model_note
from tandemlm.ui.compare_tab import HIDDEN, compare_reply
from tandemlm.ui.judges import Judges
from tandemlm.ui.vote_panel import record_vote

RANDOM_SEED = (64, 0.7, 1.0, 0, -1)


def _last(slots, blind=False, rng=None, sampling=RANDOM_SEED):
    return list(compare_reply(slots, Judges(), "hi", None, *sampling, blind=blind, rng=rng))[-1]


def test_blind_battles_shuffle_sides_and_hide_names_and_divergence_until_the_vote(make_slots, tmp_path):
    slots = make_slots("hello", "world")
    lefts = set()
    for seed in range(12):
        left, _, left_stats, right_stats, left_div, right_div, comparison, _ = _last(slots, blind=True, rng=random.Random(seed))
        lefts.add(comparison.left.model)
        assert (left_stats.split(" · ")[0], right_stats.split(" · ")[0]) == ("**model A**", "**model B**")
        assert "pol" not in left_stats + right_stats and "ref" not in left_stats + right_stats
        assert left_div == right_div == HIDDEN
        assert comparison.left.response == left[-1]["content"]
    assert lefts == {"pol", "ref"}  # each side got each model
    status, voted = record_vote(str(tmp_path / "votes.jsonl"), comparison, "right")
    left_role = "policy" if comparison.left.model == "pol" else "reference"
    assert f"Left was the **{left_role}** (`{comparison.left.model}`)" in status
    named_left, named_right = voted.reveal
    div_left, div_right = voted.divergence()
    assert named_right.split(" · ")[0].endswith("(mock)")
    assert named_left.startswith(f"**{left_role}** `{comparison.left.model}` (mock)") and "Σ log π/π_ref" in div_left + div_right


def test_sighted_battles_keep_policy_left_with_names(make_slots):
    _, _, left_stats, right_stats, left_div, _, comparison, _ = _last(make_slots(), rng=random.Random(1))
    assert left_stats.startswith("**policy** `pol`") and right_stats.startswith("**reference** `ref`")
    assert left_div != HIDDEN and comparison.reveal is None


def test_votes_record_the_seed_each_side_used(make_slots, tmp_path):
    comparison = _last(make_slots())[6]
    assert isinstance(comparison.left.seed, int) and isinstance(comparison.right.seed, int)
    record_vote(str(tmp_path / "v.jsonl"), comparison, "left")
    record = json.loads((tmp_path / "v.jsonl").read_text())
    assert record["left"]["seed"] == comparison.left.seed and record["right"]["seed"] is not None
    fixed = _last(make_slots(), sampling=(64, 0.7, 1.0, 0, 5))[6]
    assert (fixed.left.seed, fixed.right.seed, fixed.params.seed) == (5, 5, 5)


def test_the_page_says_when_policy_and_reference_are_the_same_model(make_slots):
    slots = make_slots()
    assert same_model_note(slots) == ""
    slots["policy"].set("ref")
    assert "policy and reference are the same model (`ref`)" in same_model_note(slots)
    assert "same model" in _last(slots)[-1]


def test_leaderboard_tables_rank_the_models_in_the_votes_file(make_slots, tmp_path):
    votes = str(tmp_path / "votes.jsonl")
    assert leaderboard_tables(votes)[0] == [] and "No battles yet" in leaderboard_tables(votes)[2]
    slots = make_slots("hello", "world")
    for label in ("left", "left", "left", "right", "tie"):
        record_vote(votes, _last(slots)[6], label)
    board, pairs, note = leaderboard_tables(votes, rounds=20)
    assert [row[0] for row in board] == ["pol", "ref"] and board[0][3:] == [5, 3, 1, 1]
    assert board[0][1] > 1000 > board[1][1]
    assert ["pol", "ref", "70%", 5] in pairs and ["ref", "pol", "30%", 5] in pairs
    assert note.startswith("5 battles")


def test_a_blind_battle_keeps_its_hidden_sides_for_the_whole_conversation(make_slots, tmp_path):
    from tandemlm.ui.compare_tab import compare_views

    slots, rng = make_slots("hello", "world"), random.Random(3)
    conversation, sides = None, set()
    for text in ("hi", "more", "and more"):
        *_, view = compare_views(slots, Judges(), text, None, *RANDOM_SEED, blind=True, rng=rng, conversation=conversation)
        conversation = view.conversation
        sides.add((view.comparison.left.model, view.comparison.right.model))
        left_stats, right_stats = view.values()[2:4]
        assert (left_stats.split(" · ")[0], right_stats.split(" · ")[0]) == ("**model A**", "**model B**")
        assert view.divergence == {"left": HIDDEN, "right": HIDDEN}
    assert len(sides) == 1 and conversation.user_turns == 3  # one coin flip per conversation, not per turn
    status, voted = record_vote(str(tmp_path / "votes.jsonl"), view.comparison, "left")
    assert "Left was the" in status and voted.reveal[0].startswith(("**policy** `pol`", "**reference** `ref`"))
    assert "Σ log π/π_ref" in voted.divergence()[0]
    [record] = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [m["content"] for m in record["prompt"] if m["role"] == "user"] == ["hi", "more", "and more"]


def test_ticking_blind_mid_conversation_keeps_the_conversation_as_it_started_and_says_so(make_slots):
    from tandemlm.ui.compare_tab import compare_views

    slots = make_slots()
    *_, first = compare_views(slots, Judges(), "hi", None, *RANDOM_SEED)
    *_, second = compare_views(slots, Judges(), "more", None, *RANDOM_SEED, blind=True, conversation=first.conversation)
    assert second.values()[2].startswith("**policy** `pol`") and second.divergence["left"] != HIDDEN
    assert "This conversation is not blind to the end" in second.status and second.status.endswith("done: vote below")
