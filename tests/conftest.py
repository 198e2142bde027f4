"""Session-wide fixtures any test can use: tiny real-architecture models, built once and cached.

The first run builds them into ``cache_dir()/fixtures`` (about 2 minutes on 2 cores, mostly
reading Qwen2's vocab GGUF and running llama.cpp's converter); later runs only look them up.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tandemlm.testing.tiny_models import fixture_gguf, tiny_model

pytest_plugins = ["ci_skips"]  # under CI=true only a missing GPU may skip a test


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """HF folder: 2-layer Llama with SmolLM2's tokenizer and chat template."""
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    """HF folder: 2-layer Qwen2 with R1-Distill-Qwen's tokens and template (prompt ends ``<think>\\n``)."""
    return tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_deepseek_v3_dir() -> Path:
    """HF folder: 2-layer DeepSeek-V3 (MLA, one MoE layer) with DeepSeek-V3's tokenizer and template."""
    return tiny_model("deepseek_v3")


@pytest.fixture(scope="session")
def tiny_llama_gguf() -> Path:
    """The tiny Llama as an f32 GGUF made by llama.cpp's converter."""
    return fixture_gguf("llama", "f32")


@pytest.fixture(scope="session")
def tiny_qwen2_gguf() -> Path:
    """The tiny Qwen2 as an f32 GGUF made by llama.cpp's converter."""
    return fixture_gguf("qwen2", "f32")


@pytest.fixture(scope="session")
def tiny_deepseek_v3_gguf() -> Path:
    """The tiny DeepSeek-V3 as an f32 GGUF made by llama.cpp's converter."""
    return fixture_gguf("deepseek_v3", "f32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip cleanly on machines without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(engine: Any, **app_options: Any) -> Iterator[str]:
    """Yields the base URL (``http://127.0.0.1:PORT/v1``) of a live server for ``engine``."""
    import uvicorn

    from tandemlm.deploy.server.app import create_app

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
