"""The Compare tab's handler: both sides stream at once, divergence and judges, errors per side."""

from __future__ import annotations

import math
import re

from tandemlm.ui.compare.conversation import RunGuard
from tandemlm.ui.compare.events import CLEARED, RUNNING, restart_event, turn_event
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.outputs import TurnOutputs
from tandemlm.ui.compare.turn import compare_reply, compare_views
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
    assert any(0 < len(_text(u.left_bot)) < 15 and 0 < len(_text(u.right_bot)) < 15 for u in updates)
    last = updates[-1]
    assert last.left_bot[-1]["content"] == "a" * 15 and last.right_bot[-1]["content"] == "b" * 15
    assert "**policy** `pol` (mock) · 15 tokens" in last.left_stats and "15 chars" in last.left_stats
    assert "**reference** `ref` (mock)" in last.right_stats and "finished (stop)" in last.right_stats
    assert last.status == "done: vote below"
    comparison = last.comparison
    assert (comparison.left.response, comparison.right.response) == ("a" * 15, "b" * 15)
    assert comparison.prompt == [{"role": "user", "content": "hi"}] and comparison.params.max_tokens == 64


def test_divergence_is_scored_under_both_models(make_slots):
    *_, last = _run(make_slots("hello", "world"))
    kl = 4 * (math.log(0.9) - math.log(0.01))  # see test_divergence: 4 of 5 characters differ
    assert re.search(rf"policy answer</b>: Σ log π/π_ref = <b>\+{kl:.3f}</b> nats over 5 tokens", last.left_divergence)
    assert re.search(rf"reference answer</b>: Σ log π/π_ref = <b>-{kl:.3f}</b>", last.right_divergence)


def test_judges_show_under_each_answer_and_a_broken_one_does_not_break_the_tab(make_slots):
    def verifier(prompt, response):
        raise RuntimeError("no checker for this task")

    judges = Judges(reward=lambda prompt, response: len(response) / 10, verifier=verifier)
    *_, last = _run(make_slots("hello", "hi"), judges=judges)
    assert "reward 0.500 · verifier error: no checker for this task" in last.left_stats
    assert "reward 0.200" in last.right_stats and last.comparison is not None


def test_system_prompt_goes_first(make_slots):
    *_, last = _run(make_slots(), system="Be brief.")
    assert last.comparison.prompt[0] == {"role": "system", "content": "Be brief."}


def test_empty_prompt_sends_nothing(make_slots):
    slots = make_slots()
    [update] = _run(slots, prompt="  ")
    assert update.status == "Type a prompt first." and update.comparison is None
    assert not slots["policy"].loaded and not slots["reference"].loaded


def test_a_model_that_fails_to_load_shows_on_its_side_and_the_other_still_answers(make_slots):
    slots = make_slots()
    slots["reference"].set("/no/such/model")
    *_, last = _run(slots)
    assert last.left_bot[-1]["content"] == "hello" and last.right_bot == [{"role": "user", "content": "hi"}]
    assert last.right_stats.endswith("⚠ model path /no/such/model does not exist")
    assert last.comparison is None and last.status.startswith("⚠ one side failed") and last.left_divergence == ""
    assert "⚠ model path /no/such/model does not exist" in slots["reference"].status()


def test_prompt_over_the_context_length_is_shown_per_side(make_slots):
    *_, last = _run(make_slots(), prompt="x" * 3000)
    assert "⚠ prompt is" in last.left_stats and "context window is 2048 tokens" in last.right_stats
    assert last.comparison is None


def test_stop_ends_both_answers_and_leaves_nothing_to_vote_on(make_slots):
    slots, flag = make_slots("a" * 200, "b" * 200, delay=0.01), StopFlag()
    stream = compare_reply(slots, Judges(), "hi", None, *SAMPLING, stop=flag)
    while not _text(next(stream).left_bot):  # until the left answer has begun
        pass
    flag.stop()
    *_, last = list(stream)
    assert 0 < len(_text(last.left_bot)) < 200 and len(_text(last.right_bot)) < 200
    assert " · stopped · " in last.left_stats and " · stopped · " in last.right_stats
    assert last.comparison is None and last.status == "stopped: nothing to vote on"
    engines = {slots[role].get() for role in ("policy", "reference")}
    assert sum(engine.cancelled for engine in engines) == 2  # both requests freed


def _record_chats(slots) -> dict[str, list[list[dict]]]:
    """What each slot's engine is sent, per role."""
    sent: dict[str, list[list[dict]]] = {"policy": [], "reference": []}
    for role in sent:
        engine = slots[role].get()
        real = engine.chat

        def chat(messages, params, tools=None, real=real, role=role):
            sent[role].append([dict(m) for m in messages])
            return real(messages, params, tools)

        engine.chat = chat
    return sent


def _turn(slots, text, conversation=None, **options):
    *_, view = compare_views(slots, Judges(), text, "Be brief.", *SAMPLING, conversation=conversation, **options)
    return view


def test_a_follow_up_sends_each_side_its_own_history_and_both_panes_show_the_user_turns(make_slots):
    slots = make_slots("hello", "world")
    sent = _record_chats(slots)
    first = _turn(slots, "hi")
    assert first.box == "" and first.conversation.user_turns == 1  # the box empties: the next message follows up
    second = _turn(slots, "and then?", first.conversation)
    system = {"role": "system", "content": "Be brief."}
    assert sent["policy"][-1] == [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                  {"role": "user", "content": "and then?"}]
    assert sent["reference"][-1][2] == {"role": "assistant", "content": "world"}  # its own reply, not the policy's
    shown = second.outputs()
    assert [(m["role"], m["content"]) for m in shown.left_bot] == [
        ("user", "hi"), ("assistant", "hello"), ("user", "and then?"), ("assistant", "hello")]
    assert [m["content"] for m in shown.right_bot if m["role"] == "user"] == ["hi", "and then?"]
    assert shown.status == "done: vote below" and shown.comparison.prompt == sent["policy"][-1]
    assert shown.comparison.right.context == sent["reference"][-1]


def test_the_user_turn_shows_in_both_panes_while_the_answers_stream(make_slots):
    updates = [v.outputs() for v in compare_views(make_slots("a" * 10, "b" * 10, delay=0.01), Judges(), "hi", None, *SAMPLING)]
    assert updates[0].left_bot == updates[0].right_bot == [{"role": "user", "content": "hi"}]
    assert any(u.left_bot[0] == {"role": "user", "content": "hi"} and 0 < len(_text(u.left_bot)) < 10 for u in updates)


def test_a_failed_turn_stays_out_of_the_conversation_and_keeps_the_message_to_resend(make_slots):
    slots = make_slots()
    first = _turn(slots, "hi")
    slots["reference"].set("/no/such/model")
    failed = _turn(slots, "again", first.conversation)
    assert failed.conversation is first.conversation and failed.box == "again" and failed.comparison is None


def test_a_second_compare_while_one_runs_is_refused_with_a_message_and_the_first_goes_on(make_slots):
    slots, guard, flag = make_slots("a" * 100, "b" * 100, delay=0.01), RunGuard(), StopFlag()
    running = compare_views(slots, Judges(), "hi", None, *SAMPLING, guard=guard, stop=flag)
    next(running)
    flag.stop()  # a Stop press the refused click must not undo (it would re-arm the flag)
    [refused] = list(compare_views(slots, Judges(), "hi", None, *SAMPLING, guard=guard, stop=flag))
    assert refused.busy and refused.status == "A comparison is already running: wait for it or press Stop."
    *_, last = list(running)
    assert last.status == "stopped: nothing to vote on" and not guard.running
    assert _turn(slots, "hi", guard=guard).status == "done: vote below"  # free again once the first ended


def test_the_compare_handler_shows_the_refusal_as_a_toast_and_leaves_the_other_outputs(make_slots):
    import gradio as gr
    import pytest

    guard = RunGuard()
    assert guard.begin()
    with pytest.warns(UserWarning, match="already running"):
        [update] = list(turn_event(make_slots(), Judges(), StopFlag(), guard, None, False, False, "hi", None, *SAMPLING))
    assert update.status == "A comparison is already running: wait for it or press Stop."
    assert all(value == gr.skip() for name, value in update._asdict().items() if name != "status")


def test_new_conversation_clears_everything_but_not_while_a_comparison_runs(make_slots):
    import pytest

    guard = RunGuard()
    cleared = restart_event(guard)
    assert cleared == TurnOutputs(
        left_bot=[], right_bot=[], left_stats="", right_stats="", left_divergence="", right_divergence="",
        comparison=None, status=CLEARED, conversation=None, prompt="", vote_status="",
    )
    guard.begin()
    with pytest.warns(UserWarning, match="press Stop first"):
        refused = restart_event(guard)
    assert refused.status == RUNNING and refused.conversation != None  # noqa: E711 - a skip update, not a cleared state
    slots = make_slots("hello", "world")
    updates = list(turn_event(slots, Judges(), StopFlag(), RunGuard(), None, False, False, "hi", None, *SAMPLING))
    assert updates[-1].conversation.user_turns == 1 and updates[-1].prompt == ""


def _record_params(slots) -> dict[str, list]:
    """The SamplingParams each slot's engine is sent, per role."""
    sent: dict[str, list] = {"policy": [], "reference": []}
    for role in sent:
        engine = slots[role].get()
        real = engine.chat

        def chat(messages, params, tools=None, real=real, role=role):
            sent[role].append(params)
            return real(messages, params, tools)

        engine.chat = chat
    return sent


def test_the_unbiased_kl_box_samples_both_sides_at_t1_over_the_sliders_and_the_label_says_unbiased(make_slots):
    sliders = (64, 0.7, 0.9, 40, 7)  # max tokens, temperature, top-p, top-k, seed
    for ticked, sampled in ((True, (1.0, 1.0, 0)), (False, (0.7, 0.9, 40))):
        slots = make_slots("hello", "world")
        sent = _record_params(slots)
        updates = list(turn_event(slots, Judges(), StopFlag(), RunGuard(), None, False, ticked, "hi", None, *sliders))
        *_, last = updates
        left_div, right_div, comparison = last.left_divergence, last.right_divergence, last.comparison
        assert last.status == "done: vote below"
        for role in ("policy", "reference"):
            [params] = sent[role]
            assert (params.temperature, params.top_p, params.top_k) == sampled, (ticked, role)
            assert (params.max_tokens, params.seed) == (64, 7)  # the other settings are the sliders' still
        assert (comparison.params.temperature, comparison.params.top_p, comparison.params.top_k) == sampled
        if ticked:
            assert "KL(policy ‖ reference); unbiased: this answer was sampled at T=1, top-p 1." in left_div
            assert "unbiased: this answer was sampled at T=1" in right_div
        else:
            assert "biased: this answer was sampled at T=0.7, top-p 0.9, top-k 40, not T=1" in left_div
            assert "unbiased:" not in left_div and "unbiased:" not in right_div
