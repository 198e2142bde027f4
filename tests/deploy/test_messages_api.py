"""Anthropic's Messages API (``POST /v1/messages``) on the mock engine, through the real ``anthropic`` SDK."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.server.anthropic_api import matched_stop

USER = [{"role": "user", "content": "hello"}]
WEATHER = {"name": "get_weather", "description": "Weather of a city.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.fixture(scope="module")
def server(serve):
    engines = {
        "echo": MockEngine(model_id="echo"),  # replies the last user message reversed
        "thinker": MockEngine(model_id="thinker", reply="<think>plan</think>Hello there. Bye"),
        "caller": MockEngine(model_id="caller", reply=CALL, constrained=True),
    }
    with serve(engines) as url:
        yield url


def sdk(url: str, key: str = "x", timeout: float = 20) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=key, max_retries=0, timeout=timeout)


def chat(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)


def test_a_plain_message_equals_the_chat_completion_of_the_same_conversation(server):
    message = sdk(server).messages.create(model="echo", max_tokens=64, messages=USER, metadata={"user_id": "u1"})
    same = chat(server).chat.completions.create(model="echo", max_tokens=64, messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == same.choices[0].message.content == "olleh"
    assert (message.stop_reason, message.stop_sequence, message.model) == ("end_turn", None, "echo")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (same.usage.prompt_tokens, same.usage.completion_tokens)


def test_a_system_prompt_and_earlier_turns_reach_the_prompt(server):
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": [{"type": "text", "text": "se"}, {"type": "text", "text": "cond"}]},
    ]
    message = sdk(server).messages.create(model="echo", max_tokens=64, system="Be brief.", messages=turns)
    as_chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
               {"role": "assistant", "content": "reply"}, {"role": "user", "content": "second"}]
    same = chat(server).chat.completions.create(model="echo", max_tokens=64, messages=as_chat)
    assert message.content[0].text == "dnoces" == same.choices[0].message.content
    assert message.usage.input_tokens == same.usage.prompt_tokens  # the system prompt and history were sent


@pytest.mark.parametrize("model", ["echo", "thinker"])
def test_a_streamed_message_ends_as_the_whole_one(server, model):
    whole = sdk(server).messages.create(model=model, max_tokens=64, messages=USER)
    with sdk(server).messages.stream(model=model, max_tokens=64, messages=USER) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == next(b.text for b in whole.content if b.type == "text")
    assert final.model_dump(exclude={"id"}) == whole.model_dump(exclude={"id"})
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_reasoning_comes_as_a_thinking_block_first(server):
    message = sdk(server).messages.create(model="thinker", max_tokens=64, messages=USER)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in message.content] == [
        ("thinking", "plan"),
        ("text", "Hello there. Bye"),
    ]


def test_the_raw_event_sequence_is_anthropics(server):
    body = {"model": "thinker", "max_tokens": 64, "messages": USER, "stream": True}
    with httpx.stream("POST", f"{server}/messages", json=body, timeout=20) as response:
        lines = [line for line in response.iter_lines() if line.startswith("event: ")]
    kinds = [line.removeprefix("event: ") for line in lines]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks = [k for k in kinds if k in ("content_block_start", "content_block_stop")]
    assert blocks == ["content_block_start", "content_block_stop"] * 2  # thinking, then text


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_and_the_turn_after_its_result(server, stream):
    client = sdk(server)
    request = {"model": "caller", "max_tokens": 200, "messages": USER, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    (call,) = message.content
    assert (call.type, call.name, call.input, message.stop_reason) == ("tool_use", "get_weather", {"city": "Paris"}, "tool_use")
    follow = [
        *USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
    ]
    prompt = httpx.post(f"{server.removesuffix('/v1')}/apply-template", timeout=20, json={
        "model": "echo", "messages": [USER[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(call.input)}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]}).json()["prompt"]
    assert "<|tool|>sunny" in prompt
    answer = client.messages.create(model="echo", max_tokens=64, messages=follow)
    same = chat(server).chat.completions.create(model="echo", max_tokens=64, messages=[
        USER[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
    assert answer.usage.input_tokens == same.usage.prompt_tokens and answer.stop_reason == "end_turn"


def test_tool_choice_any_none_and_no_parallel_calls_translate(server):
    client = sdk(server)
    forced = client.messages.create(model="caller", max_tokens=200, messages=USER, tools=[WEATHER], tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use" and forced.content[0].input == {"city": "Paris"}
    none = client.messages.create(model="caller", max_tokens=200, messages=USER, tools=[WEATHER], tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and [b.type for b in none.content] == ["text"]
    single = client.messages.create(
        model="caller", max_tokens=200, messages=USER, tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True}
    )
    assert [b.type for b in single.content] == ["tool_use"]


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_cut_is_max_tokens(server, stream):
    request = {"model": "echo", "max_tokens": 3, "messages": USER}
    if stream:
        with sdk(server).messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = sdk(server).messages.create(**request)
    assert (message.content[0].text, message.stop_reason, message.stop_sequence, message.usage.output_tokens) == ("oll", "max_tokens", None, 3)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stops", "text", "reason", "matched"),
    [
        (["zzz", " there"], "Hello", "stop_sequence", " there"),
        (["Bye", "e"], "H", "stop_sequence", "e"),  # the earliest in the output fired, not the first listed
        (["zzz"], "Hello there. Bye", "end_turn", None),  # ended by itself: no stop sequence in its tokens
    ],
)
def test_a_stop_sequence_is_reported_with_the_one_that_matched(server, stream, stops, text, reason, matched):
    request = {"model": "thinker", "max_tokens": 64, "messages": USER, "stop_sequences": stops}
    if stream:
        with sdk(server).messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = sdk(server).messages.create(**request)
    got = next(b.text for b in message.content if b.type == "text")
    assert (got, message.stop_reason, message.stop_sequence) == (text, reason, matched)


def test_matched_stop_ties_and_absence():
    assert matched_stop(b"abc", ["bc", "b"]) == "bc"  # both start at the same place: the first listed
    assert matched_stop(b"abc", ["x"]) is None and matched_stop(b"abc", None) is None


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking is not supported by this server"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x"}}]}]},
         "content blocks of type 'image' are not supported"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools of type 'web_search_20250305' are not supported"),
        ({"tool_choice": {"type": "any"}}, "tool_choice needs tools"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_what_cannot_be_honoured_is_a_bad_request_naming_it(server, extra, fragment):
    request = {"model": "echo", "max_tokens": 16, "messages": USER, **extra}
    with pytest.raises(anthropic.BadRequestError, match=fragment) as caught:
        sdk(server).messages.create(**request)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"


def test_an_unknown_model_is_not_found_in_anthropics_shape(server):
    with pytest.raises(anthropic.NotFoundError, match="served models") as caught:
        sdk(server).messages.create(model="claude-opus-4", max_tokens=16, messages=USER)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_the_api_key_is_read_from_x_api_key_and_a_wrong_one_refused(serve):
    with serve(MockEngine(model_id="echo"), api_key="sekret") as url:
        assert sdk(url, "sekret").messages.create(model="echo", max_tokens=8, messages=USER).content[0].text == "olleh"
        with pytest.raises(anthropic.AuthenticationError) as caught:
            sdk(url, "wrong").messages.create(model="echo", max_tokens=8, messages=USER)
        assert caught.value.body["error"]["type"] == "authentication_error"
        assert chat(url).with_options(api_key="sekret").models.list().data  # Bearer still works


def test_messages_are_counted_in_the_metrics(server):
    sdk(server).messages.create(model="echo", max_tokens=8, messages=USER)
    text = httpx.get(f"{server.removesuffix('/v1')}/metrics", timeout=20).text
    assert 'endpoint="/v1/messages"' in text or '"/v1/messages"' in text


# ---- the built-in SmolLM2 on llama.cpp (real generation: no greedy strings asserted) ---------------
# `live_smollm2` (tests/deploy/conftest.py): a served llama.cpp engine of the built-in model.


def test_a_real_model_streams_calls_tools_and_stops_on_a_sequence(live_smollm2):
    url, model = live_smollm2
    client = sdk(url, timeout=180)  # real decoding on CPUs other tests may be sharing
    ask = [{"role": "user", "content": "Tell me about the sea."}]
    with client.messages.stream(model=model, max_tokens=24, messages=ask) as events:
        texts = list(events.text_stream)
        final = events.get_final_message()
    assert final.content[0].text == "".join(texts) and final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 24 and final.usage.input_tokens > 0
    called = client.messages.create(model=model, max_tokens=64, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
    (call,) = [b for b in called.content if b.type == "tool_use"]
    assert call.name == "get_weather" and isinstance(call.input, dict) and called.stop_reason == "tool_use"
    # A space comes within 64 tokens of any English answer: the stop fires, and is reported as the one.
    stopped = client.messages.create(model=model, max_tokens=64, messages=ask, stop_sequences=["\u2603", " "])
    text = "".join(b.text for b in stopped.content if b.type == "text")
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", " ") and " " not in text


@pytest.mark.parametrize("model", ["echo", "caller"])
def test_count_tokens_equals_the_input_tokens_a_message_reports(server, model):
    """The SDK's messages.count_tokens counts what messages.create prefills: system, turns, tools and a forced call."""
    body = {"model": model, "system": "Be brief.", "messages": [*USER, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "weather?"}]}
    if model == "caller":
        body |= {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    counted = sdk(server).messages.count_tokens(**body).input_tokens
    created = sdk(server).messages.create(max_tokens=64, **body)
    assert counted == created.usage.input_tokens > 0
    shorter = sdk(server).messages.count_tokens(model=model, messages=USER).input_tokens
    assert shorter < counted  # it counts the request, not a constant


def test_count_tokens_refuses_generation_settings_in_anthropics_shape(server):
    response = httpx.post(f"{server.removesuffix('/v1')}/v1/messages/count_tokens", json={"model": "echo", "messages": USER, "max_tokens": 5}, timeout=20)
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and "max_tokens is not part of a count_tokens request" in body["error"]["message"]
