"""Blind battles, seeds on record, the same-model warning, the leaderboard view over the votes file."""

from __future__ import annotations

import json
import random

from tandemlm.ui.compare.arena import same_model_note
from tandemlm.ui.compare.divergence_scoring import HIDDEN
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.leaderboard_panel import leaderboard_tables
from tandemlm.ui.compare.turn import compare_reply
from tandemlm.ui.compare.vote_panel import record_vote

RANDOM_SEED = (64, 0.7, 1.0, 0, -1)


def _last(slots, blind=False, rng=None, sampling=RANDOM_SEED):
    return list(compare_reply(slots, Judges(), "hi", None, *sampling, blind=blind, rng=rng))[-1]


def test_blind_battles_shuffle_sides_and_hide_names_and_divergence_until_the_vote(make_slots, tmp_path):
    slots = make_slots("hello", "world")
    lefts = set()
    for seed in range(12):
        last = _last(slots, blind=True, rng=random.Random(seed))
        left_stats, right_stats, comparison = last.left_stats, last.right_stats, last.comparison
        lefts.add(comparison.left.model)
        assert (left_stats.split(" · ")[0], right_stats.split(" · ")[0]) == ("**model A**", "**model B**")
        assert "pol" not in left_stats + right_stats and "ref" not in left_stats + right_stats
        assert last.left_divergence == last.right_divergence == HIDDEN
        assert comparison.left.response == last.left_bot[-1]["content"]
    assert lefts == {"pol", "ref"}  # each side got each model
    status, voted = record_vote(str(tmp_path / "votes.jsonl"), comparison, "right")
    left_role = "policy" if comparison.left.model == "pol" else "reference"
    assert f"Left was the **{left_role}** (`{comparison.left.model}`)" in status
    named_left, named_right = voted.reveal
    div_left, div_right = voted.divergence()
    assert named_right.split(" · ")[0].endswith("(mock)")
    assert named_left.startswith(f"**{left_role}** `{comparison.left.model}` (mock)") and "Σ log π/π_ref" in div_left + div_right


def test_sighted_battles_keep_policy_left_with_names(make_slots):
    last = _last(make_slots(), rng=random.Random(1))
    assert last.left_stats.startswith("**policy** `pol`") and last.right_stats.startswith("**reference** `ref`")
    assert last.left_divergence != HIDDEN and last.comparison.reveal is None


def test_votes_record_the_seed_each_side_used(make_slots, tmp_path):
    comparison = _last(make_slots()).comparison
    assert isinstance(comparison.left.seed, int) and isinstance(comparison.right.seed, int)
    record_vote(str(tmp_path / "v.jsonl"), comparison, "left")
    record = json.loads((tmp_path / "v.jsonl").read_text())
    assert record["left"]["seed"] == comparison.left.seed and record["right"]["seed"] is not None
    fixed = _last(make_slots(), sampling=(64, 0.7, 1.0, 0, 5)).comparison
    assert (fixed.left.seed, fixed.right.seed, fixed.params.seed) == (5, 5, 5)


def test_the_page_says_when_policy_and_reference_are_the_same_model(make_slots):
    slots = make_slots()
    assert same_model_note(slots) == ""
    slots["policy"].set("ref")
    assert "policy and reference are the same model (`ref`)" in same_model_note(slots)
    assert "same model" in _last(slots).status


def test_leaderboard_tables_rank_the_models_in_the_votes_file(make_slots, tmp_path):
    votes = str(tmp_path / "votes.jsonl")
    assert leaderboard_tables(votes).ratings == [] and "No battles yet" in leaderboard_tables(votes).note
    slots = make_slots("hello", "world")
    for label in ("left", "left", "left", "right", "tie"):
        record_vote(votes, _last(slots).comparison, label)
    tables = leaderboard_tables(votes, rounds=20)
    board, pairs = tables.ratings, tables.pairs
    assert [row[0] for row in board] == ["pol", "ref"] and board[0][3:] == [5, 3, 1, 1]
    assert board[0][1] > 1000 > board[1][1]
    assert ["pol", "ref", "70%", 5] in pairs and ["ref", "pol", "30%", 5] in pairs
    assert tables.note.startswith("5 battles")


def test_a_vote_reveals_a_blind_battle_by_name_and_leaves_a_sighted_one_as_shown(make_slots, tmp_path):
    import gradio as gr

    from tandemlm.ui.compare.vote_panel import vote_event

    votes = str(tmp_path / "votes.jsonl")
    blind = _last(make_slots("hello", "world"), blind=True, rng=random.Random(0)).comparison
    shown = vote_event(votes, blind, "", "left", 4.0)
    assert shown.vote_status.startswith("Recorded **left**") and shown.comparison.voted == "left"
    assert (shown.left_stats, shown.right_stats) == blind.reveal and "Σ log π/π_ref" in shown.left_divergence
    assert "1 votes" in shown.votes_info
    sighted = vote_event(votes, _last(make_slots()).comparison, "", "tie")
    assert sighted.comparison.voted == "tie" and "2 votes" in sighted.votes_info
    assert (sighted.left_stats, sighted.right_stats, sighted.left_divergence, sighted.right_divergence) == (gr.skip(),) * 4


def test_a_blind_battle_keeps_its_hidden_sides_for_the_whole_conversation(make_slots, tmp_path):
    from tandemlm.ui.compare.turn import compare_views

    slots, rng = make_slots("hello", "world"), random.Random(3)
    conversation, sides = None, set()
    for text in ("hi", "more", "and more"):
        *_, view = compare_views(slots, Judges(), text, None, *RANDOM_SEED, blind=True, rng=rng, conversation=conversation)
        conversation = view.conversation
        sides.add((view.comparison.left.model, view.comparison.right.model))
        left_stats, right_stats = view.outputs().left_stats, view.outputs().right_stats
        assert (left_stats.split(" · ")[0], right_stats.split(" · ")[0]) == ("**model A**", "**model B**")
        assert view.divergence == {"left": HIDDEN, "right": HIDDEN}
    assert len(sides) == 1 and conversation.user_turns == 3  # one coin flip per conversation, not per turn
    status, voted = record_vote(str(tmp_path / "votes.jsonl"), view.comparison, "left")
    assert "Left was the" in status and voted.reveal[0].startswith(("**policy** `pol`", "**reference** `ref`"))
    assert "Σ log π/π_ref" in voted.divergence()[0]
    [record] = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    assert [m["content"] for m in record["prompt"] if m["role"] == "user"] == ["hi", "more", "and more"]


def test_ticking_blind_mid_conversation_keeps_the_conversation_as_it_started_and_says_so(make_slots):
    from tandemlm.ui.compare.turn import compare_views

    slots = make_slots()
    *_, first = compare_views(slots, Judges(), "hi", None, *RANDOM_SEED)
    *_, second = compare_views(slots, Judges(), "more", None, *RANDOM_SEED, blind=True, conversation=first.conversation)
    assert second.outputs().left_stats.startswith("**policy** `pol`") and second.divergence["left"] != HIDDEN
    assert "This conversation is not blind to the end" in second.status and second.status.endswith("done: vote below")
