"""``tandem serve --tensor-parallel-size N / --pipeline-parallel-size N``: passed to vLLM, refused elsewhere in one line."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``tandem serve`` on a mock engine: records the EngineOptions each load got; nothing listens."""
    import uvicorn

    import tandemlm.cli.main as cli_main
    from tandemlm.deploy.mock_engine import MockEngine

    seen: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)

    def load(model: str, options: Any, **extra: Any) -> MockEngine:
        seen.append(options)
        return MockEngine(model_id=model)

    monkeypatch.setattr(cli_main, "_load", load)
    return seen


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be a positive integer, got 0"),
        (["--pipeline-parallel-size", "-2"], "--pipeline-parallel-size must be a positive integer, got -2"),
        (
            ["--backend", "llama.cpp", "--tensor-parallel-size", "2"],
            "--tensor-parallel-size: the llama.cpp backend runs a model on one device; only --backend vllm splits it across GPUs",
        ),
        (
            ["--backend", "transformers", "--pipeline-parallel-size", "2"],
            "--pipeline-parallel-size: the transformers backend runs a model on one device; only --backend vllm splits it across GPUs",
        ),
    ],
)
def test_parallel_sizes_a_backend_cannot_honour_are_one_line(loads, flags, message):
    result = runner.invoke(app, ["serve", "smollm2", *flags])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {message}")
    assert not loads  # refused before any model loads


def test_parallel_sizes_reach_the_vllm_load(loads):
    result = runner.invoke(app, ["serve", "smollm2", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "3"])
    assert result.exit_code == 0, result.output
    [options] = loads
    asked = options.load_options()
    assert options.backend == "vllm"  # auto means vllm once a model is split
    assert (asked.tensor_parallel_size, asked.pipeline_parallel_size) == (2, 3)
    from tandemlm.deploy.load_options import backend_kwargs
    from tandemlm.deploy.registry import backends

    kwargs = backend_kwargs(asked, "vllm", backends()["vllm"].options)
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (2, 3)


def test_one_device_keeps_the_chosen_backend(loads):
    result = runner.invoke(app, ["serve", "smollm2", "--backend", "llama.cpp", "--tensor-parallel-size", "1"])
    assert result.exit_code == 0, result.output
    assert loads[0].backend == "llama.cpp"


def test_vllm_engine_args_take_both_sizes():
    """The vllm backend passes on the options that are EngineArgs fields; these two must be among them."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    assert {"tensor_parallel_size", "pipeline_parallel_size"} <= set(EngineArgs.__dataclass_fields__)


@pytest.mark.gpu
@pytest.mark.slow
def test_tensor_parallel_vllm_answers_like_one_gpu(tiny_llama_dir):
    """Two GPUs: the tiny model split in two gives the same greedy tokens as on one GPU."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.registry import load_engine
    from tandemlm.deploy.types import SamplingParams

    replies = []
    for size in (1, 2):
        engine = load_engine(str(tiny_llama_dir), backend="vllm", tensor_parallel_size=size, multiprocessing=True)
        try:
            reply = collect(engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0)))
        finally:
            engine.close()
        replies.append(reply.text)
    assert replies[0] == replies[1]
