"""Runs a real uvicorn server for an engine on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(engine: Engine, **app_options: object) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:PORT/v1``) of a live server for ``engine``."""
    port = free_port()
    config = uvicorn.Config(create_app(engine, **app_options), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve():
    """The :func:`running_server` context manager, for tests that start their own server."""
    return running_server


def check_close_fails_running_and_queued(engine: Engine, ids: list[int], params: object) -> None:
    """close() answers a running and a queued caller with an EngineError (none left blocked), refuses
    new work afterwards, and may be called twice. ``params`` must make generation run long."""
    from tandemlm.errors import EngineError

    started, submitted = threading.Event(), threading.Event()
    errors: dict[str, BaseException | None] = {}

    def running() -> None:
        try:
            for _ in engine.stream_tokens(ids, params):  # type: ignore[attr-defined]
                started.set()
            errors["running"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["running"] = exc

    def queued() -> None:
        try:
            stream = engine.stream_tokens(ids, params)  # type: ignore[attr-defined]  # submitted while the first decodes
            submitted.set()
            list(stream)
            errors["queued"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["queued"] = exc

    threads = [threading.Thread(target=running, daemon=True), threading.Thread(target=queued, daemon=True)]
    threads[0].start()
    assert started.wait(60)
    threads[1].start()
    assert submitted.wait(10)
    engine.close()
    for thread in threads:
        thread.join(timeout=10)  # a liveness check: a caller left blocked would hang here
    assert not any(thread.is_alive() for thread in threads), "a caller was left blocked after close()"
    for name in ("running", "queued"):
        assert isinstance(errors[name], EngineError) and "closed" in str(errors[name]), (name, errors[name])
    with pytest.raises(EngineError, match="closed"):
        engine.stream_tokens(ids, params)  # type: ignore[attr-defined]
    engine.close()  # a second close is harmless


@pytest.fixture(scope="session")
def close_check():
    """:func:`check_close_fails_running_and_queued`, for the engine test modules."""
    return check_close_fails_running_and_queued


def generate_all_at_once(jobs: list[tuple[Engine, str]], params: object) -> list[str]:
    """Each ``(engine, prompt)`` generated from its own thread, all released together (so they batch)."""
    from tandemlm.deploy.engine import collect

    texts: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        texts[i] = collect(jobs[i][0].generate(jobs[i][1], params)).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [texts[i] for i in range(len(jobs))]


@pytest.fixture(scope="session")
def all_at_once():
    """:func:`generate_all_at_once`, for the adapter test modules."""
    return generate_all_at_once

