"""The Compare tab's handler: both sides stream at once, divergence and judges, errors per side."""

from __future__ import annotations

import math
import re

from tandemlm.ui.compare_tab import compare_reply
from tandemlm.ui.judges import Judges
from tandemlm.ui.stopping import StopFlag

SAMPLING = (64, 0.7, 1.0, 0, -1)


def _text(bot: list[dict]) -> str:
    """The answer in a pane (the pane also shows the user's message above it)."""
    return bot[-1]["content"] if bot and bot[-1]["role"] == "assistant" else ""


def _run(slots, prompt="hi", judges=None, system=None):
    return list(compare_reply(slots, judges or Judges(), prompt, system, *SAMPLING))


def test_both_sides_stream_at_the_same_time(make_slots):
    slots = make_slots("a" * 15, "b" * 15, delay=0.01)
    updates = _run(slots)
    # An update where both answers are partial shows they were decoding together, not one after the other.
    assert any(0 < len(_text(u[0])) < 15 and 0 < len(_text(u[1])) < 15 for u in updates)
    left, right, left_stats, right_stats, *_, comparison, status = updates[-1]
    assert left[-1]["content"] == "a" * 15 and right[-1]["content"] == "b" * 15
    assert "**policy** `pol` (mock) · 15 tokens" in left_stats and "15 chars" in left_stats
    assert "**reference** `ref` (mock)" in right_stats and "finished (stop)" in right_stats
    assert status == "done: vote below"
    assert (comparison.left.response, comparison.right.response) == ("a" * 15, "b" * 15)
    assert comparison.prompt == [{"role": "user", "content": "hi"}] and comparison.params.max_tokens == 64


def test_divergence_is_scored_under_both_models(make_slots):
    *_, (_, _, _, _, left_div, right_div, _, _) = _run(make_slots("hello", "world"))
    kl = 4 * (math.log(0.9) - math.log(0.01))  # see test_divergence: 4 of 5 characters differ
    assert re.search(rf"policy answer</b>: Σ log π/π_ref = <b>\+{kl:.3f}</b> nats over 5 tokens", left_div)
    assert re.search(rf"reference answer</b>: Σ log π/π_ref = <b>-{kl:.3f}</b>", right_div)


def test_judges_show_under_each_answer_and_a_broken_one_does_not_break_the_tab(make_slots):
    def verifier(prompt, response):
        raise RuntimeError("no checker for this task")

    judges = Judges(reward=lambda prompt, response: len(response) / 10, verifier=verifier)
    *_, (_, _, left_stats, right_stats, _, _, comparison, _) = _run(make_slots("hello", "hi"), judges=judges)
    assert "reward 0.500 · verifier error: no checker for this task" in left_stats
    assert "reward 0.200" in right_stats and comparison is not None


def test_system_prompt_goes_first(make_slots):
    *_, (*_, comparison, _) = _run(make_slots(), system="Be brief.")
    assert comparison.prompt[0] == {"role": "system", "content": "Be brief."}


def test_empty_prompt_sends_nothing(make_slots):
    slots = make_slots()
    [update] = _run(slots, prompt="  ")
    assert update[-1] == "Type a prompt first." and update[-2] is None
    assert not slots["policy"].loaded and not slots["reference"].loaded


def test_a_model_that_fails_to_load_shows_on_its_side_and_the_other_still_answers(make_slots):
    slots = make_slots()
    slots["reference"].set("/no/such/model")
    *_, (left, right, _, right_stats, left_div, _, comparison, status) = _run(slots)
    assert left[-1]["content"] == "hello" and right == [{"role": "user", "content": "hi"}]
    assert right_stats.endswith("⚠ model path /no/such/model does not exist")
    assert comparison is None and status.startswith("⚠ one side failed") and left_div == ""
    assert "⚠ model path /no/such/model does not exist" in slots["reference"].status()


def test_prompt_over_the_context_length_is_shown_per_side(make_slots):
    *_, (_, _, left_stats, right_stats, _, _, comparison, _) = _run(make_slots(), prompt="x" * 3000)
    assert "⚠ prompt is" in left_stats and "context window is 2048 tokens" in right_stats
    assert comparison is None


def test_stop_ends_both_answers_and_leaves_nothing_to_vote_on(make_slots):
    slots, flag = make_slots("a" * 200, "b" * 200, delay=0.01), StopFlag()
    stream = compare_reply(slots, Judges(), "hi", None, *SAMPLING, stop=flag)
    while not _text(next(stream)[0]):  # until the left answer has begun
        pass
    flag.stop()
    *_, (left, right, left_stats, right_stats, _, _, comparison, status) = list(stream)
    assert 0 < len(_text(left)) < 200 and len(_text(right)) < 200
    assert " · stopped · " in left_stats and " · stopped · " in right_stats
    assert comparison is None and status == "stopped: nothing to vote on"
    engines = {slots[role].get() for role in ("policy", "reference")}
    assert sum(engine.cancelled for engine in engines) == 2  # both requests freed
