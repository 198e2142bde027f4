"""The OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from tandemlm.deploy.mock_engine import MockEngine


@pytest.fixture(scope="module")
def mock_server(serve):
    engine = MockEngine(model_id="mock-model", reply="<think>plan</think>Hello there")
    with serve(engine, api_key="sekret") as url:
        yield url, engine


def client(url: str, key: str = "sekret") -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=20)


def test_models_lists_the_engine_model(mock_server):
    url, _ = mock_server
    assert [m.id for m in client(url).models.list().data] == ["mock-model"]


def test_chat_completion_with_reasoning_and_usage(mock_server):
    url, _ = mock_server
    result = client(url).chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
    message = result.choices[0].message
    assert message.content == "Hello there"
    assert message.model_extra["reasoning_content"] == "plan"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == len("<think>plan</think>Hello there")
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streamed_chat_matches_the_whole_response(mock_server):
    url, _ = mock_server
    stream = client(url).chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True, stream_options={"include_usage": True}
    )
    content, reasoning, usage, finish = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            finish = choice.finish_reason or finish
    assert (content, reasoning, finish) == ("Hello there", "plan", "stop")
    assert usage is not None and usage.completion_tokens > 0


def test_text_completion_stream_and_stop(mock_server):
    url, _ = mock_server
    result = client(url).completions.create(model="mock-model", prompt="x", stop=["there"], max_tokens=50)
    assert result.choices[0].text == "<think>plan</think>Hello "
    assert result.choices[0].finish_reason == "stop"
    chunks = list(client(url).completions.create(model="mock-model", prompt="x", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "<thin"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_wrong_api_key_is_rejected_in_openai_shape(mock_server):
    url, _ = mock_server
    with pytest.raises(openai.AuthenticationError) as info:
        client(url, key="wrong").models.list()
    assert info.value.body["code"] == "invalid_api_key"


def test_missing_api_key_is_rejected_before_the_body_is_read(mock_server):
    url, _ = mock_server
    base = url.removesuffix("/v1")
    response = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200  # only /v1 needs the key


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"messages": []}).encode(), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), "temperature must be"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "top_p": "NaN"}).encode(), "top_p must be a finite number"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), "n=1"),
    ],
)
def test_bad_requests_get_400_in_openai_shape_and_the_server_keeps_serving(mock_server, body, fragment):
    url, _ = mock_server
    headers = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
    response = httpx.post(f"{url}/chat/completions", content=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert client(url).models.list().data


def test_prompt_over_the_context_is_a_400_naming_the_limit(serve):
    with serve(MockEngine(context_length=16)) as url:
        with pytest.raises(openai.BadRequestError) as info:
            client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 50}])
    assert info.value.body["code"] == "context_length_exceeded"
    assert "context window is 16 tokens" in info.value.body["message"]


def test_disconnecting_client_frees_its_slot(serve):
    engine = MockEngine(reply="x" * 400, delay=0.01)
    with serve(engine, max_concurrency=1) as url:
        with httpx.stream(
            "POST", f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
        ) as response:
            for _ in zip(range(3), response.iter_lines(), strict=False):
                pass
        # The one slot must come free: a second request completes although the first never finished.
        deadline = time.time() + 10
        while engine.cancelled == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert engine.cancelled == 1
        result = client(url, key="k").chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}], max_tokens=3)
        assert result.choices[0].message.content == "xxx"


def test_queue_beyond_its_bound_gets_503_and_queued_requests_wait_their_turn(serve):
    engine = MockEngine(reply="y" * 20, delay=0.02)
    with serve(engine, max_concurrency=1, max_queue=1) as url:
        def ask(_: int) -> int:
            body = {"messages": [{"role": "user", "content": "q"}]}
            return httpx.post(f"{url}/chat/completions", json=body, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
    assert codes.count(200) >= 2
    assert set(codes) <= {200, 503}
    assert 503 in codes
