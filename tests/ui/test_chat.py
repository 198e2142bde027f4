"""The Chat tab's handler on mock engines: streaming, turns, reasoning, stop, and bad input as messages."""

from __future__ import annotations

from itertools import pairwise

from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.errors import EngineError
from tandemlm.ui.chat_tab import chat_display, chat_reply, engine_messages
from tandemlm.ui.stopping import StopFlag

SAMPLING = (64, 0.7, 1.0, 0, -1)  # max tokens, temperature, top-p, top-k, seed


def _never_called():
    raise AssertionError("the engine must not be asked")


def test_reply_streams_progressively_longer_text_and_ends_with_stats():
    engine = MockEngine(reply="Hello there")
    updates = list(chat_reply(lambda: engine, "hi", [], None, *SAMPLING))
    answers = [u[0][-1]["content"] for u in updates if u[0][-1]["role"] == "assistant"]
    assert answers[-1] == "Hello there"
    assert all(len(a) <= len(b) for a, b in pairwise(answers))
    assert len({len(a) for a in answers}) >= 10  # many partial states, not one final blob
    shown, _, box, stats = updates[-1]
    assert shown == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]
    assert box == "" and stats.startswith("11 tokens · ") and "tokens/s" in stats and "finished (stop)" in stats


def test_second_turn_sends_the_whole_conversation_with_the_system_prompt():
    engine = MockEngine()  # replies with the last user message reversed
    *_, (_, turns, _, _) = chat_reply(lambda: engine, "abc", [], "Be terse.", *SAMPLING)
    *_, (_, turns, _, _) = chat_reply(lambda: engine, "xyz", turns, "Be terse.", *SAMPLING)
    assert [t["content"] for t in turns] == ["abc", "cba", "xyz", "zyx"]
    assert engine_messages(turns, " Be terse. ")[0] == {"role": "system", "content": "Be terse."}
    assert engine_messages(turns, "  ")[0]["role"] == "user"


def test_reasoning_is_shown_collapsible_and_kept_out_of_the_history():
    engine = MockEngine(reply="<think>2+2 is 4</think>It is 4.")
    updates = list(chat_reply(lambda: engine, "2+2?", [], None, *SAMPLING))
    thinking = [u[0] for u in updates if u[0][-1].get("metadata")]
    assert thinking and thinking[0][-1]["metadata"] == {"title": "Reasoning", "status": "pending"}
    shown, turns, _, _ = updates[-1]
    assert shown[1] == {"role": "assistant", "content": "2+2 is 4", "metadata": {"title": "Reasoning", "status": "done"}}
    assert shown[2] == {"role": "assistant", "content": "It is 4."}
    assert engine_messages(turns, None)[-1] == {"role": "assistant", "content": "It is 4."}


def test_empty_message_asks_for_text_and_sends_nothing():
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    [(shown, kept, box, stats)] = list(chat_reply(_never_called, "   ", turns, None, *SAMPLING))
    assert kept is turns and len(shown) == 2 and box == "   " and stats == "Type a message first."


def test_load_failure_is_a_message_and_keeps_the_prompt():
    def fail():
        raise EngineError("model path /nope does not exist")

    [(_, turns, box, stats)] = list(chat_reply(fail, "hello", [], None, *SAMPLING))
    assert turns == [] and box == "hello" and stats == "⚠ model path /nope does not exist"


def test_prompt_over_the_context_length_is_a_message():
    engine = MockEngine(context_length=40)
    [(_, turns, _, stats)] = list(chat_reply(lambda: engine, "x" * 100, [], None, *SAMPLING))
    assert turns == [] and stats.startswith("⚠ prompt is") and "context window is 40 tokens" in stats


def test_bad_sampling_value_names_the_control():
    [(_, _, _, stats)] = list(chat_reply(_never_called, "hi", [], None, 64, 0.7, 0.0, 0, -1))
    assert stats == "⚠ top-p must be greater than 0, got 0"


def test_stop_ends_the_reply_keeps_the_partial_answer_and_frees_the_engine_request():
    engine, flag = MockEngine(reply="a long answer that will not finish", delay=0.01), StopFlag()
    flag.stop()  # a press from before this request must not stop it
    stream = chat_reply(lambda: engine, "hi", [], None, *SAMPLING, stop=flag)
    for _ in range(4):
        next(stream)
    flag.stop()
    *_, (shown, turns, _, stats) = list(stream)
    assert 0 < len(turns[-1]["content"]) < len("a long answer that will not finish")
    assert shown[-1]["content"] == turns[-1]["content"] and stats.endswith(" · stopped")
    assert engine.cancelled == 1


def test_a_dropped_event_closes_the_engine_request_too():
    engine = MockEngine(reply="a long answer that will not finish", delay=0.01)
    stream = chat_reply(lambda: engine, "hi", [], None, *SAMPLING)
    for _ in range(4):
        next(stream)
    stream.close()  # what Gradio does when the browser tab goes away mid-reply
    assert engine.cancelled == 1


def test_display_of_turns_without_reasoning_is_plain_messages():
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": ""}]
    assert chat_display(turns) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
