"""The OpenAI-compatible server, driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time

import httpx
import openai
import pytest

from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.server.config import ServerConfig


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
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), "n: Input should be greater than or equal to 1"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "bogus": 1}).encode(), "bogus is not supported by this server"),
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
            client(url).chat.completions.create(model="mock", messages=[{"role": "user", "content": "x" * 50}])
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
        result = client(url, key="k").chat.completions.create(model="mock", messages=[{"role": "user", "content": "y"}], max_tokens=3)
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


def test_a_streaming_burst_past_the_queue_gets_only_whole_streams_and_503s(serve, burst):
    engine = MockEngine(reply="z" * 40, delay=0.01)
    with serve(engine, max_concurrency=2, max_queue=2) as url:
        for _ in range(3):
            outcomes = burst(url, 12)
            assert not [o for o in outcomes if o.startswith("broken")], outcomes
            assert outcomes.count("done") >= 4 and "503" in outcomes, outcomes
        assert httpx.get(url.removesuffix("/v1") + "/health").json()["running"] == 0


def test_max_queue_zero_means_no_waiting_room_not_refusing_everything(serve):
    engine = MockEngine(reply="w" * 30, delay=0.02)
    with serve(engine, max_concurrency=1, max_queue=0) as url:
        body = {"messages": [{"role": "user", "content": "q"}]}
        assert httpx.post(f"{url}/chat/completions", json=body, timeout=30).status_code == 200  # idle server

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{url}/chat/completions", json=body, timeout=30).status_code, range(3)))
    assert sorted(codes) == [200, 503, 503]


@pytest.mark.parametrize(("options", "message"), [({"max_queue": -1}, "max_queue"), ({"max_concurrency": 0}, "max_concurrency")])
def test_admission_refuses_impossible_limits(options, message):
    from tandemlm.deploy.server.app import create_app

    with pytest.raises(ValueError, match=message):
        create_app(MockEngine(), **options)


def test_a_20_mb_body_gets_413_before_parsing_while_health_keeps_answering(serve):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * 20_000_000}]}).encode()
    with serve(MockEngine(), api_key="k") as url:
        base = url.removesuffix("/v1")
        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        slowest = 0.0

        def post() -> httpx.Response:
            return httpx.post(f"{url}/chat/completions", content=huge, headers=headers, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(post)
            while not future.done():
                started = time.perf_counter()
                assert httpx.get(f"{base}/health", timeout=5).status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
                time.sleep(0.02)
            response = future.result()
        assert response.status_code == 413
        error = response.json()["error"]
        assert "8 MiB" in error["message"] and "--max-body-mb" in error["message"]
        assert slowest < 1.0

        # A chunked body (no Content-Length) is cut off at the limit too.
        def chunks():
            for _ in range(20):
                yield b"x" * 1_000_000

        response = httpx.post(f"{url}/chat/completions", content=chunks(), headers=headers, timeout=60)
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert client(url, key="k").models.list().data


def test_with_an_api_key_only_health_is_open_and_it_shows_only_liveness(mock_server):
    url, _ = mock_server
    base = url.removesuffix("/v1")
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models", "/nowhere"):
        response = httpx.get(f"{base}{path}")
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/openapi.json", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert "running" in httpx.get(f"{base}/health", headers={"Authorization": "Bearer sekret"}).json()


@pytest.mark.parametrize("header", ["sekret", "Basic sekret", "Bearer", "Bearer  wrong", "Bearersekret"])
def test_the_api_key_must_come_as_a_bearer_token(mock_server, header):
    url, _ = mock_server
    assert httpx.get(f"{url}/models", headers={"Authorization": header}).status_code == 401
    assert httpx.get(f"{url}/models", headers={"Authorization": "bearer sekret"}).status_code == 200


def test_a_foreign_host_header_gets_400_against_dns_rebinding(serve):
    with serve(MockEngine(), **ServerConfig(allowed_hosts=["api.example"]).app_options()) as url:
        port = url.split(":")[2].split("/")[0]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            response = httpx.get(f"{url}/models", headers={"Host": host})
            assert response.status_code == 400, host
            assert "Host" in response.json()["error"]["message"] and "--allowed-hosts" in response.json()["error"]["message"]
        for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "API.example", "api.example:80"):
            assert httpx.get(f"{url}/models", headers={"Host": host}).status_code == 200, host
    with serve(MockEngine(), **ServerConfig(allowed_hosts=["*"]).app_options()) as url:
        assert httpx.get(f"{url}/models", headers={"Host": "anything.example"}).status_code == 200


def test_the_bind_address_and_listed_names_are_accepted_hosts():
    assert ServerConfig(host="10.1.2.3", allowed_hosts=["a.example,B.example", "[fd00::1]"]).accepted_hosts() == [
        "localhost", "127.0.0.1", "::1", "10.1.2.3", "a.example", "b.example", "fd00::1"
    ]
    assert socket.gethostname().lower() in ServerConfig(host="0.0.0.0").accepted_hosts()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"port": 70000}, "port must be between 1 and 65535, got 70000"),
        ({"port": 0}, "port must be between 1 and 65535"),
        ({"n_parallel": 0}, "n_parallel must be at least 1"),
        ({"max_queue": -1}, "max_queue must be 0 (no waiting room) or more"),
        ({"max_body_mb": 0}, "max_body_mb must be a positive number"),
        ({"api_key": " "}, "api_key must not be empty"),
        ({"allowed_hosts": ["a,,b"]}, "allowed_hosts has an empty name"),
    ],
)
def test_server_config_refuses_bad_values_naming_the_field(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerConfig(**options)


def test_a_queued_stream_whose_client_leaves_gives_its_place_back(serve):
    engine = MockEngine(reply="v" * 300, delay=0.01)
    body = {"messages": [{"role": "user", "content": "q"}], "stream": True, "max_tokens": 300}
    with serve(engine, max_concurrency=1, max_queue=1) as url:
        health = url.removesuffix("/v1") + "/health"
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as queued:
                assert queued.status_code == 200
                assert httpx.get(health).json()["queued"] == 1
            deadline = time.time() + 5
            while httpx.get(health).json()["queued"] and time.time() < deadline:
                time.sleep(0.05)
            assert httpx.get(health).json() == {"status": "ok", "running": 1, "queued": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_failure_is_a_500_server_error_not_the_clients_fault(serve, stream):
    """A request that passed validation and then failed in the engine is our failure (5xx), not a 400."""
    engine = MockEngine(model_id="m", reply="Hello", fail="llama.cpp decode failed: llama_decode returned -3")
    with serve(engine) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=20)
        if stream:  # headers are already sent: the error comes in-band, then [DONE]
            assert response.status_code == 200
            events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        else:
            assert response.status_code == 500
            error = response.json()["error"]
            assert error["type"] == "server_error" and "decode failed" in error["message"]
        bad = httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": []}, timeout=20)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"  # still the client's


@pytest.mark.parametrize("stream", [True, False])
def test_a_cancelled_requests_slot_comes_free_only_once_the_engine_lets_go(serve, monkeypatch, stream):
    """The engine never holds more than --n-parallel requests, even when it is slow to drop a cancelled one."""
    from tandemlm.deploy.server import service

    monkeypatch.setattr(service, "CANCEL_WAIT_S", 0.2)  # the engine lingers well past the server's wait
    engine = MockEngine(reply="v" * 300, delay=0.01, linger=1.5)
    body = {"messages": [{"role": "user", "content": "q"}], "max_tokens": 300, "stream": stream}
    with serve(engine, max_concurrency=1, max_queue=2) as url:
        if stream:
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=30) as leaving:
                next(leaving.iter_lines())  # then hangs up mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up waiting: the server sees it leave
                httpx.post(f"{url}/chat/completions", json=body, timeout=0.3)
        deadline = time.time() + 10
        while engine.cancelled == 0 and time.time() < deadline:
            time.sleep(0.02)
        after = httpx.post(f"{url}/chat/completions", json={**body, "max_tokens": 3, "stream": False}, timeout=30)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "vvv"
    assert engine.cancelled == 1
    assert engine.most_inside == 1, "a slot was handed on while the engine still held the cancelled request"


@pytest.mark.parametrize(
    "body",
    [{"prompt": "q", "n": 5}, {"prompt": ["a", "b", "c", "d", "e"]}, {"prompt": [[97], [98], [99], [100], [101]]}],
    ids=["n=5", "5 prompts", "5 token-id prompts"],
)
def test_completion_choices_beyond_the_slots_are_refused_not_served_past_them(serve, body):
    """With --n-parallel 2 and no waiting room, 5 choices are refused (all of them count), never a 200."""
    engine = MockEngine(reply="w" * 20, delay=0.01)
    with serve(engine, max_concurrency=2, max_queue=0) as url:
        refused = httpx.post(f"{url}/completions", json={**body, "max_tokens": 20}, timeout=30)
        served = httpx.post(f"{url}/completions", json={"prompt": ["a", "b"], "max_tokens": 20}, timeout=30)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert refused.status_code in (400, 503), refused.text
    assert "at most 2 (--n-parallel)" in refused.json()["error"]["message"]
    assert served.status_code == 200 and len(served.json()["choices"]) == 2
    assert f'tandem_requests_total{{endpoint="/v1/completions",status="{refused.status_code}"}} 1.0' in metrics
    assert engine.most_inside <= 2
