"""The pure helpers of ``bench/serve_load.py``: its statistics, and its flags.

No server runs and nothing compiles here (the bench itself is never part of the test run).
"""

from __future__ import annotations

import importlib
import io
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _bench_module("_serve_clients", monkeypatch)


def test_percentile_interpolates_and_skips_nan(clients: ModuleType) -> None:
    assert clients.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert clients.percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert clients.percentile([5.0, math.nan], 95) == 5.0
    assert math.isnan(clients.percentile([math.nan], 50))


def test_summarize_counts_tokens_over_wall_time_and_time_per_output_token(clients: ModuleType) -> None:
    results = [
        clients.StreamResult(ttft=0.5, tokens=11, total=1.5, gaps=[0.1] * 10),
        clients.StreamResult(ttft=1.0, tokens=1, total=1.0, gaps=[]),  # one token: no TPOT
    ]
    stats = clients.summarize(results, elapsed=2.0)
    assert stats["tokens_per_s"] == pytest.approx(6.0)
    assert stats["tpot_p50"] == pytest.approx(0.1) and stats["tpot_p95"] == pytest.approx(0.1)
    assert stats["ttft_p50"] == pytest.approx(0.75)
    assert stats["itl_p95"] == pytest.approx(0.1)


def test_a_dropped_connection_is_counted_and_the_load_level_goes_on(clients: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-server dropped one connection at 16 clients in a paired run, and the bench used to stop there."""
    import asyncio

    import httpx

    posts = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        posts.append(request)
        if len(posts) == 2:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        chunk = {"choices": [{"delta": {"content": "hi"}}]}
        body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    real = httpx.AsyncClient
    monkeypatch.setattr(clients.httpx, "AsyncClient", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))
    stats = asyncio.run(clients.load("http://server/v1", clients=2, max_tokens=4, rounds=2))
    assert len(posts) == 4 and stats["failed"] == 1 and stats["requests"] == 3
    assert stats["tokens"] == 6  # 2 tokens from each finished request, none from the dropped one


def test_ratios_are_ours_over_theirs_and_nan_without_a_baseline(clients: ModuleType) -> None:
    ours = dict.fromkeys(clients.METRICS, 2.0)
    theirs = {**dict.fromkeys(clients.METRICS, 4.0), "itl_p95": 0.0}
    q = clients.ratios(ours, theirs)
    assert q["tokens_per_s"] == 0.5 and q["ttft_p95"] == 0.5
    assert math.isnan(q["itl_p95"])


def test_quick_shrinks_the_run_and_unknown_servers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    serve_load = _bench_module("serve_load", monkeypatch)
    args = serve_load.parse_args(["--quick"])
    assert args.levels == [1, 4] and args.rounds == 1 and args.max_tokens == 16
    assert serve_load.parse_args([]).levels == [1, 4, 8, 16]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--servers", "tandem,ollama"])


def test_target_lines_say_met_or_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    serve_load = _bench_module("serve_load", monkeypatch)
    anchor = {n: {"tokens_per_s": 100.0, "ttft_p95": 1.0, "cpu_per_token": 0.010} for n in (8, 16)}
    ours = {8: {"tokens_per_s": 110.0, "ttft_p95": 0.9, "cpu_per_token": 0.009},
            16: {"tokens_per_s": 110.0, "ttft_p95": 0.9, "cpu_per_token": 0.012}}  # 16: more CPU per token
    lines = serve_load.target_lines(ours, anchor)
    assert lines[0].endswith("met") and "CPU/token 0.90x" in lines[0]
    assert lines[1].endswith("MISSED") and "CPU/token 1.20x" in lines[1]
    del ours[8]["cpu_per_token"]  # not measured: not met
    assert serve_load.target_lines(ours, anchor)[0].endswith("MISSED")


def test_cpu_seconds_count_the_server_and_its_children(clients: ModuleType) -> None:
    import subprocess
    import sys

    burn = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time\\nt=time.process_time()\\nwhile time.process_time()-t<0.6: pass\\ntime.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", burn])
    try:
        import time

        time.sleep(2.5)  # the child has burnt its 0.6 s and sleeps
        assert clients.cpu_seconds(parent.pid) >= 0.6
    finally:
        import psutil

        for process in psutil.Process(parent.pid).children(recursive=True):
            process.kill()
        parent.kill()
