"""Session-wide fixtures any test can use: tiny real-architecture models, built once and cached.

The first run builds them into ``cache_dir()/fixtures`` (about 2 minutes on 2 cores, mostly
reading Qwen2's vocab GGUF and running llama.cpp's converter); later runs only look them up.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tandemlm.fixtures import fixture_gguf, tiny_model


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
