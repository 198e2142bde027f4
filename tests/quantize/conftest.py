"""Quantize-test fixtures: one session-wide quantize cache, so each model converts to f16 once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tandemlm.quantize.pipeline import QuantizeConfig, QuantizeResult, quantize_model
from tandemlm.testing.tiny_models import tiny_model


@pytest.fixture(scope="session")
def quant_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quantize cache private to this test session (intermediates and verified results)."""
    return tmp_path_factory.mktemp("quant-cache")


@pytest.fixture(scope="session")
def quantized(quant_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], QuantizeResult]:
    """``quantized(model, qtype)``: the verified result, made once per session.

    ``model`` is a tiny-fixture arch (llama, qwen2, deepseek_v3) or ``smollm2`` (the built-in).
    """
    out_dir = tmp_path_factory.mktemp("quantized")
    made: dict[tuple[str, str], QuantizeResult] = {}

    def make(model: str, qtype: str) -> QuantizeResult:
        if (model, qtype) not in made:
            ref = model if model == "smollm2" else str(tiny_model(model))
            config = QuantizeConfig(model=ref, qtype=qtype, out=out_dir / f"{model}-{qtype}.gguf", cache_root=quant_cache)
            made[model, qtype] = quantize_model(config)
        return made[model, qtype]

    return make


def _leftovers(*folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix in (".partial", ".unverified")]
    return found


@pytest.fixture(scope="session")
def leftovers() -> Callable[..., list[Path]]:
    """``leftovers(*folders)``: temp files (hidden names, .partial/.unverified) anywhere under ``folders``."""
    return _leftovers
