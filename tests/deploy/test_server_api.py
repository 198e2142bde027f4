"""The OpenAI request surface on the mock engine: strictness, n, log-probabilities, prompts, tools, introspection."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tandemlm.deploy.mock_engine import MockEngine

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(serve):
    engines = {
        "mock-model": MockEngine(model_id="mock-model", reply="<think>plan</think>Hello there"),
        "caller": MockEngine(model_id="caller", reply='{"name": "get_weather", "arguments": {"city": "Paris"}}'),
        "twice": MockEngine(model_id="twice", reply='{"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}'),
        "thinker": MockEngine(model_id="thinker", reply='<think>Paris weather: call it.</think>{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    }
    with serve(engines) as url:
        yield url, engines


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=20)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=20)


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/chat/completions", {"messages": USER, "functions": [{"name": "f"}]}, 400, "functions is not supported"),
        ("/chat/completions", {"messages": USER, "audio": {"voice": "x"}}, 400, "audio is not supported"),
        ("/chat/completions", {"messages": USER, "store": True}, 400, "store=true is not supported"),
        ("/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
        ("/chat/completions", {"messages": USER, "tool_choice": "required"}, 400, "tool_choice needs tools"),
        ("/chat/completions", {"messages": USER, "n": 0}, 400, "n: Input should be greater than or equal to 1"),
        ("/chat/completions", {"messages": USER, "n": 9}, 400, "at most 8 (--n-parallel)"),
        ("/chat/completions", {"messages": USER, "min_p": 0.1}, 400, "min_p is not supported by the mock backend"),
        ("/chat/completions", {"messages": USER, "logit_bias": {"5": 1}}, 400, "logit_bias is not supported by the mock"),
        ("/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
        ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "'image_url' are not supported"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x", "audio": 1}]}, 400, "messages.0.audio is not supported"),
        ("/chat/completions", {"model": "gpt-4o", "messages": USER}, 404, "served models: mock-model, caller, twice, thinker"),
        ("/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix (fill-in-the-middle) is not supported"),
        ("/completions", {"prompt": "x", "best_of": 3}, 400, "best_of is not supported"),
        ("/completions", {"prompt": "x", "max_tokens": 0}, 400, "only allowed with echo=true"),
        ("/completions", {"prompt": [1, -4]}, 400, "prompt[1] = -4 is not a token id"),
        ("/completions", {"prompt": "x", "echo": True, "logprobs": 2}, 400, "top_logprobs is not supported by the mock backend"),
    ],
)
def test_requests_we_cannot_honour_get_an_error_naming_the_field(server, path, body, status, fragment):
    url, _ = server
    response = post(url, path, body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]


def test_both_reasoning_names_and_n_choices_with_their_own_index(server):
    url, _ = server
    result = client(url).chat.completions.create(model="mock-model", messages=USER, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for choice in result.choices:
        assert choice.message.content == "Hello there"
        assert choice.message.model_extra["reasoning_content"] == choice.message.model_extra["reasoning"] == "plan"
    # prompt tokens count once, completion tokens for every choice
    single = client(url).chat.completions.create(model="mock-model", messages=USER)
    assert result.usage.prompt_tokens == single.usage.prompt_tokens
    assert result.usage.completion_tokens == 3 * single.usage.completion_tokens


def test_streamed_n_choices_each_end_once(server):
    url, _ = server
    texts, finishes = {}, {}
    for chunk in client(url).chat.completions.create(model="mock-model", messages=USER, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert texts == {0: "Hello there", 1: "Hello there"}
    assert finishes == {0: ["stop"], 1: ["stop"]}


def test_chat_logprobs_come_in_openais_shape_whole_and_streamed(server):
    url, _ = server
    result = client(url).chat.completions.create(model="mock-model", messages=USER, logprobs=True, max_tokens=4)
    content = result.choices[0].logprobs.content
    assert [t.token for t in content] == list("<thi")
    assert all(math.isclose(t.logprob, math.log(0.9)) and t.bytes == list(t.token.encode()) for t in content)
    streamed = []
    for chunk in client(url).chat.completions.create(model="mock-model", messages=USER, logprobs=True, max_tokens=4, stream=True):
        for choice in chunk.choices:
            streamed += [t.token for t in (choice.logprobs.content if choice.logprobs else [])]
    assert streamed == list("<thi")
    plain = client(url).chat.completions.create(model="mock-model", messages=USER, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_completions_take_token_ids_lists_of_prompts_and_echo_with_logprobs(server):
    url, engines = server
    engine = engines["mock-model"]
    ids = engine.tokenize("abc", add_special_tokens=True)
    as_text = client(url).completions.create(model="mock-model", prompt=["abc", "xy"], max_tokens=2, echo=True)
    assert [c.text for c in as_text.choices] == ["abc<t", "xy<t"]
    other = engine.tokenize("xy", add_special_tokens=True)
    result = client(url).completions.create(model="mock-model", prompt=[ids, other], max_tokens=2, echo=True, logprobs=0)
    assert [c.index for c in result.choices] == [0, 1]
    first, second = result.choices
    assert first.text == "abc<t" and second.text == "xy<t"
    # echo: the prompt's tokens (the first has no log-probability), then the generated ones
    assert first.logprobs.tokens == ["", "a", "b", "c", "<", "t"]
    assert first.logprobs.token_logprobs[0] is None
    expected = engine.score_tokens(ids[:1], ids[1:])
    assert first.logprobs.token_logprobs[1:4] == pytest.approx(expected)
    assert first.logprobs.text_offset == [0, 0, 1, 2, 3, 4]
    scored = client(url).completions.create(model="mock-model", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == "abc" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected)


@pytest.mark.parametrize("stream", [False, True])
def test_an_end_token_next_stays_in_the_echoed_logprobs_as_lm_eval_reads_them(serve, stream):
    """lm-eval scores a continuation as ``token_logprobs[ctxlen:-1]`` of echo + max_tokens=1: the one
    generated token must be there even when it is the end-of-sequence token (its text left out)."""
    from tandemlm.deploy.mock_engine import EOS_ID

    engine = MockEngine(reply="")  # the scripted model ends at once, whatever the prompt
    context, continuation = engine.tokenize("Q: abc", add_special_tokens=True), engine.tokenize(" A: x")
    body = {"prompt": context + continuation, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    with serve(engine) as url:
        if stream:
            choice = _streamed_text_choice(url, body)
        else:
            reply = post(url, "/completions", body).json()
            choice = reply["choices"][0]
            assert reply["usage"]["completion_tokens"] == 0  # usage counts the answer's tokens: none
    assert choice["text"] == "Q: abc A: x" and choice["finish_reason"] == "stop"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(body["prompt"]) + 1 and logprobs["tokens"][-1] == ""
    assert logprobs["token_logprobs"][-1] == pytest.approx(engine.score_tokens(body["prompt"], [EOS_ID])[0], abs=1e-3)
    scored = logprobs["token_logprobs"][len(context) : -1]
    assert scored == pytest.approx(engine.score_tokens(context, continuation), abs=1e-3)


def _streamed_text_choice(url: str, body: dict) -> dict:
    """One streamed text completion's choice put together: its text, finish reason and log-probabilities."""
    choice: dict = {"text": "", "finish_reason": None, "logprobs": {"tokens": [], "token_logprobs": []}}
    with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True}, timeout=20) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for part in json.loads(line.removeprefix("data: "))["choices"]:
                choice["text"] += part["text"]
                choice["finish_reason"] = part["finish_reason"] or choice["finish_reason"]
                for key in ("tokens", "token_logprobs"):
                    choice["logprobs"][key] += (part["logprobs"] or {}).get(key, [])
    return choice


def test_tool_calls_are_parsed_from_a_model_without_tool_support(server):
    url, _ = server
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    result = client(url).chat.completions.create(model="caller", messages=USER, tools=tools)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    streamed, finish = {}, None
    for chunk in client(url).chat.completions.create(model="caller", messages=USER, tools=tools, stream=True):
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert streamed[0]["name"] == "get_weather" and json.loads(streamed[0]["arguments"]) == {"city": "Paris"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(openai.BadRequestError, match="response_format is not supported by the mock backend"):
        client(url).chat.completions.create(model="caller", messages=USER, tools=tools, tool_choice=named)  # grammar-forced
    other = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(openai.BadRequestError, match="get_time"):
        client(url).chat.completions.create(model="caller", messages=USER, tools=tools, tool_choice=other)
    none = client(url).chat.completions.create(model="caller", messages=USER, tools=tools, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and "get_weather" in none.choices[0].message.content


CUT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ONE_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TWO_CALLS = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("reply", "tool_choice", "max_tokens", "calls"),
    [
        (ONE_CALL, {"type": "function", "function": {"name": "get_weather"}}, 45, [("get_weather", '{"city":')]),
        (ONE_CALL, "required", 15, [("get_weather", "")]),  # cut inside the name: one tool's name starts so
        (TWO_CALLS, "required", len(TWO_CALLS) - 5, [("get_time", "{}"), ("get_weather", '{"city": "Pari')]),
    ],
    ids=["in-the-arguments", "in-the-name", "in-the-second-call"],
)
def test_a_forced_call_cut_by_max_tokens_is_a_partial_call_ending_in_length(serve, stream, reply, tool_choice, max_tokens, calls):
    """Never plain text: the calls as far as they got, with finish_reason "length" (the mock's scripted
    reply stands in for the grammar-constrained output, one character per token)."""
    engine = MockEngine(model_id="m", reply=reply, constrained=True)
    body = {"messages": USER, "tools": CUT_TOOLS, "tool_choice": tool_choice, "max_tokens": max_tokens}
    with serve(engine) as url:
        if stream:
            content, got, finish = "", {}, None
            for chunk in client(url).chat.completions.create(model="m", stream=True, **body):
                for choice in chunk.choices:
                    content += choice.delta.content or ""
                    for delta in choice.delta.tool_calls or []:
                        entry = got.setdefault(delta.index, ["", ""])
                        entry[0] += delta.function.name or ""
                        entry[1] += delta.function.arguments or ""
                    finish = choice.finish_reason or finish
            got = [tuple(got[i]) for i in sorted(got)]
        else:
            choice = client(url).chat.completions.create(model="m", **body).choices[0]
            content, finish = choice.message.content, choice.finish_reason
            got = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or []]
    assert (finish, got) == ("length", calls)
    assert not content


def test_without_parallel_tool_calls_a_reply_carries_only_its_first_call(server):
    url, _ = server
    tools = [{"type": "function", "function": {"name": name}} for name in ("a", "b")]
    both = client(url).chat.completions.create(model="twice", messages=USER, tools=tools)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["a", "b"]
    one = client(url).chat.completions.create(model="twice", messages=USER, tools=tools, parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["a"]
    names = [
        d.function.name
        for chunk in client(url).chat.completions.create(model="twice", messages=USER, tools=tools, parallel_tool_calls=False, stream=True)
        for c in chunk.choices
        for d in c.delta.tool_calls or []
    ]
    assert names == ["a"]


def test_a_reasoning_model_reasons_then_calls(server):
    url, _ = server
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    result = client(url).chat.completions.create(model="thinker", messages=USER, tools=tools)
    message = result.choices[0].message
    assert message.model_extra["reasoning_content"] == "Paris weather: call it."
    assert message.tool_calls[0].function.name == "get_weather" and not message.content


def test_tools_and_tool_turns_reach_the_prompt(server):
    url, _ = server
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    prompt = post(url.removesuffix("/v1"), "/apply-template", {"model": "caller", "messages": messages, "tools": tools}).json()["prompt"]
    assert "<|tool|>sunny" in prompt
    # the mock's template cannot list tools: the server describes them in a system message of its own
    assert prompt.startswith("<|system|>") and "get_weather" in prompt


def test_introspection_endpoints(server):
    url, engines = server
    base = url.removesuffix("/v1")
    tokens = post(base, "/tokenize", {"prompt": "hey"}).json()
    assert tokens["tokens"] == engines["mock-model"].tokenize("hey", add_special_tokens=True) and tokens["count"] == 4
    chat_tokens = post(base, "/tokenize", {"messages": USER}).json()["tokens"]
    assert engines["mock-model"].detokenize(chat_tokens) == engines["mock-model"].render_chat(USER)
    assert post(base, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert post(base, "/tokenize", {"prompt": "x", "model": "nope"}).status_code == 404
    assert post(base, "/tokenize", {}).json()["error"]["message"].endswith("give exactly one of prompt or messages")
    assert httpx.get(f"{base}/tokenizer_info").json() == {"bos_token": None, "eos_token": None, "pad_token": None, "chat_template": None}
    card = httpx.get(f"{url}/models/caller").json()
    assert card["id"] == "caller" and card["max_model_len"] == 2048
    assert httpx.get(f"{url}/models/nope").status_code == 404


def test_metrics_count_requests_and_tokens_in_prometheus_text(server):
    url, _ = server
    base = url.removesuffix("/v1")

    def value(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    before = httpx.get(f"{base}/metrics").text
    client(url).chat.completions.create(model="mock-model", messages=USER, max_tokens=5)
    post(url, "/chat/completions", {"messages": USER, "n": 0})
    after = httpx.get(f"{base}/metrics").text
    assert value(after, "tandem_generation_tokens_total") - value(before, "tandem_generation_tokens_total") == 5
    assert value(after, 'tandem_requests_total{endpoint="/v1/chat/completions",status="200"}') >= 1
    assert value(after, "tandem_requests_total") - value(before, "tandem_requests_total") == 2
    assert value(after, "tandem_time_to_first_token_seconds_count") > value(before, "tandem_time_to_first_token_seconds_count")
    assert "tandem_requests_queued 0.0" in after


def test_embeddings_on_a_backend_without_them_are_a_400_naming_it(server):
    url, _ = server
    response = post(url, "/embeddings", {"input": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the mock backend does not compute embeddings"
    assert post(url, "/embeddings", {"input": "hi", "extra": 1}).status_code == 400
