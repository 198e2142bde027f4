"""Picks a backend for a model reference and the machine it runs on."""

from __future__ import annotations

import importlib.util

from tandemlm.hardware import has_cuda
from tandemlm.models.resolve import ModelSource


def choose_backend(source: ModelSource) -> str:
    """GGUF files go to llama.cpp; HF folders to vLLM on a GPU when installed, else transformers."""
    if source.kind == "gguf":
        return "llama.cpp"
    if has_cuda() and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "transformers"
