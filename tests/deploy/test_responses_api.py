"""OpenAI's Responses API (``POST /v1/responses``) on the mock engine, through the real ``openai`` SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.server.responses_api import to_chat_request
from tandemlm.deploy.server.responses_api_schemas import ResponsesRequest

USER = [{"role": "user", "content": "hello"}]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}
VOLATILE = {"id", "created_at"}


@pytest.fixture(scope="module")
def server(serve):
    engines = {
        "echo": MockEngine(model_id="echo"),  # replies the last user message reversed
        "thinker": MockEngine(model_id="thinker", reply="<think>plan</think>Hello there. Bye"),
        "caller": MockEngine(model_id="caller", reply=CALL, constrained=True),
    }
    with serve(engines) as url:
        yield url


def client(url: str, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=timeout)


def without_ids(response: openai.types.responses.Response) -> dict:
    body = response.model_dump(exclude=VOLATILE, exclude_none=True)  # the stream parses: parsed=None extra
    for item in body["output"]:
        item.pop("id", None)
    return body


def test_a_string_input_equals_the_chat_completion_of_the_same_conversation(server):
    response = client(server).responses.create(model="echo", input="hello", max_output_tokens=64, metadata={"k": "v"}, store=False)
    same = client(server).chat.completions.create(model="echo", max_tokens=64, messages=USER)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text == same.choices[0].message.content == "olleh"
    (item,) = response.output
    assert (item.type, item.role, item.status, item.content[0].type) == ("message", "assistant", "completed", "output_text")
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        same.usage.prompt_tokens, same.usage.completion_tokens, same.usage.total_tokens)
    assert response.model == "echo" and response.metadata == {"k": "v"} and response.incomplete_details is None


def test_instructions_and_a_multi_turn_item_list_reach_the_prompt(server):
    items = [
        {"role": "developer", "content": "Use few words."},
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "reply", "annotations": []}]},
        {"role": "user", "content": [{"type": "input_text", "text": "se"}, {"type": "input_text", "text": "cond"}]},
    ]
    response = client(server).responses.create(model="echo", instructions="Be brief.", input=items)
    as_chat = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use few words."},
               {"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"}, {"role": "user", "content": "second"}]
    same = client(server).chat.completions.create(model="echo", messages=as_chat)
    assert response.output_text == "dnoces" == same.choices[0].message.content
    assert response.usage.input_tokens == same.usage.prompt_tokens and response.instructions == "Be brief."


@pytest.mark.parametrize("model", ["echo", "thinker"])
def test_a_streamed_response_ends_as_the_whole_one(server, model):
    whole = client(server).responses.create(model=model, input=USER, max_output_tokens=64)
    with client(server).responses.stream(model=model, input=USER, max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text == final.output_text
    assert without_ids(final) == without_ids(whole)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_reasoning_comes_as_a_reasoning_item_first(server):
    response = client(server).responses.create(model="thinker", input="hi")
    reasoning, message = response.output
    assert (reasoning.type, reasoning.summary, reasoning.content[0].text) == ("reasoning", [], "plan")
    assert message.type == "message" and response.output_text == "Hello there. Bye"


def test_the_raw_event_sequence_is_openais(server):
    body = {"model": "thinker", "input": "hi", "stream": True}
    with httpx.stream("POST", f"{server}/responses", json=body, timeout=20) as response:
        lines = list(response.iter_lines())
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == kinds
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    items = [k for k in kinds if k.startswith("response.output_item.")]
    assert items == ["response.output_item.added", "response.output_item.done"] * 2  # reasoning, then the message
    text_kinds = [k for k in kinds if "text" in k or "content_part" in k]
    assert text_kinds == [
        "response.content_part.added", *["response.reasoning_text.delta"] * 4, "response.reasoning_text.done", "response.content_part.done",
        "response.content_part.added", *["response.output_text.delta"] * 16, "response.output_text.done", "response.content_part.done",
    ]
    assert len({d["response"]["id"] for d in datas if "response" in d}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_and_the_turn_after_its_output(server, stream):
    sdk = client(server)
    request = {"model": "caller", "input": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}
    if stream:
        with sdk.responses.stream(**request) as events:
            response = events.get_final_response()
    else:
        response = sdk.responses.create(**request)
    (call,) = response.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == ("function_call", "get_weather", {"city": "Paris"}, "completed")
    assert call.id.startswith("fc_") and call.call_id and response.status == "completed"
    follow = [*USER, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    answer = sdk.responses.create(model="echo", input=follow)
    same = sdk.chat.completions.create(model="echo", messages=[
        USER[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}])
    assert answer.usage.input_tokens == same.usage.prompt_tokens and answer.output_text == same.choices[0].message.content
    again = sdk.responses.create(model="echo", input=[*USER, *[o.to_dict() for o in response.output],
                                                      {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert again.usage.input_tokens == answer.usage.input_tokens  # an output item sent back as it came reads the same


@pytest.mark.parametrize("stream", [False, True])
def test_a_max_output_tokens_cut_is_incomplete(server, stream):
    request = {"model": "echo", "input": "hello", "max_output_tokens": 3}
    if stream:
        with client(server).responses.stream(**request) as events:
            *_, last = events
        # As from OpenAI: the SDK's get_final_response() waits for response.completed, which a cut never sends.
        assert last.type == "response.incomplete"
        response = last.response
    else:
        response = client(server).responses.create(**request)
    assert (response.status, response.incomplete_details.reason, response.output_text) == ("incomplete", "max_output_tokens", "oll")
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3


def test_text_format_json_schema_becomes_the_chat_response_format(server):
    fmt = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
    chat = to_chat_request(ResponsesRequest.model_validate({"model": "echo", "input": "hi", "text": {"format": fmt}}))
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema.schema_ == SCHEMA
    assert (chat.response_format.json_schema.name, chat.response_format.json_schema.strict) == ("person", True)
    # It reaches the engine: a backend without response_format refuses it, one with it answers.
    with pytest.raises(openai.BadRequestError, match="response_format is not supported by the mock backend"):
        client(server).responses.create(model="echo", input="hi", text={"format": fmt})
    response = client(server).responses.create(model="caller", input="hi", text={"format": fmt})
    assert response.text.format.type == "json_schema" and response.status == "completed"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "content parts of type 'input_image' are not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "content parts of type 'input_file'"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input items of type 'item_reference' are not supported"),
        ({"tools": [{"type": "web_search"}]}, "tools of type 'web_search' are not supported"),
        ({"previous_response_id": "resp_1"}, "previous_response_id is not supported: this server keeps no responses"),
        ({"store": True}, "store=true is not supported: this server keeps no responses"),
        ({"reasoning": {"effort": "low"}}, "reasoning is not supported by this server"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_cannot_be_honoured_is_a_bad_request_naming_it(server, extra, fragment):
    request = {"model": "echo", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError, match=fragment) as caught:
        client(server).responses.create(**request)
    assert caught.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_is_not_found(server):
    with pytest.raises(openai.NotFoundError, match="served models"):
        client(server).responses.create(model="gpt-5", input="hi")


def test_a_failure_after_the_start_is_a_failed_response(serve):
    with serve(MockEngine(model_id="broken", fail="boom")) as url:
        body = {"model": "broken", "input": "hello", "stream": True}
        with httpx.stream("POST", f"{url}/responses", json=body, timeout=20) as response:
            datas = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]
        assert datas[-1]["type"] == "response.failed" and "boom" in datas[-1]["response"]["error"]["message"]
        with pytest.raises(openai.InternalServerError, match="boom"):
            client(url).responses.create(model="broken", input="hello")


def test_responses_are_counted_in_the_metrics(server):
    client(server).responses.create(model="echo", input="hi")
    text = httpx.get(f"{server.removesuffix('/v1')}/metrics", timeout=20).text
    assert '"/v1/responses"' in text


# ---- the built-in SmolLM2 on llama.cpp (real generation: no greedy strings asserted) ---------------
# `live_smollm2` (tests/deploy/conftest.py): a served llama.cpp engine of the built-in model.


def test_a_real_model_streams_and_calls_a_function(live_smollm2):
    url, model = live_smollm2
    sdk = client(url, timeout=180)  # real decoding on CPUs other tests may be sharing
    with sdk.responses.stream(model=model, input="Tell me about the sea.", max_output_tokens=24) as events:
        seen = list(events)
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    final = seen[-1].response  # response.completed, or response.incomplete after a cut at 24 tokens
    assert seen[-1].type == f"response.{final.status}" and final.status in ("completed", "incomplete")
    assert final.output_text == "".join(deltas)
    assert 0 < final.usage.output_tokens <= 24 and final.usage.input_tokens > 0
    called = sdk.responses.create(model=model, input="Weather in Paris?", max_output_tokens=64, tools=[WEATHER],
                                  tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments), dict)
