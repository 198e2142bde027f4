"""Load flags: each backend maps the ones it honours to its own names and refuses the others in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app
from tandemlm.deploy.load_options import LoadOptions, backend_kwargs
from tandemlm.deploy.registry import backends, load_engine
from tandemlm.errors import EngineError


def test_each_backend_maps_the_flags_it_honours_to_its_own_names() -> None:
    table = backends()
    asked = LoadOptions(n_ctx=4096, n_parallel=8, dtype="bfloat16", tensor_parallel_size=2)
    assert backend_kwargs(asked, "vllm", table["vllm"].options) == {
        "max_model_len": 4096, "max_num_seqs": 8, "dtype": "bfloat16", "tensor_parallel_size": 2,
    }
    assert backend_kwargs(LoadOptions(n_parallel=4, dtype="float32"), "transformers", table["transformers"].options) == {
        "max_batch_size": 4, "dtype": "float32",
    }
    assert backend_kwargs(LoadOptions(n_ctx=512, n_threads=2, n_gpu_layers=0, n_parallel=2), "llama.cpp",
                          table["llama.cpp"].options) == {"n_ctx": 512, "n_threads": 2, "n_gpu_layers": 0, "n_parallel": 2}
    # A parallel size of 1 is what every backend does: not a request to refuse.
    assert backend_kwargs(LoadOptions(tensor_parallel_size=1, pipeline_parallel_size=1), "llama.cpp", table["llama.cpp"].options) == {}


@pytest.mark.parametrize(
    ("backend", "options", "message"),
    [
        ("transformers", LoadOptions(n_gpu_layers=3), "--n-gpu-layers is not used by the transformers backend (it takes --n-parallel, --dtype)"),
        ("transformers", LoadOptions(n_ctx=512, n_threads=2), "--n-ctx, --n-threads are not used by the transformers backend"),
        ("llama.cpp", LoadOptions(dtype="bfloat16"), "--dtype is not used by the llama.cpp backend"),
        ("llama.cpp", LoadOptions(tensor_parallel_size=2), "--tensor-parallel-size is not used by the llama.cpp backend"),
        ("vllm", LoadOptions(n_gpu_layers=10), "--n-gpu-layers is not used by the vllm backend"),
        ("vllm", LoadOptions(n_threads=4), "--n-threads is not used by the vllm backend"),
        ("transformers", LoadOptions(cache_ram=512), "--cache-ram is not used by the transformers backend"),
        ("vllm", LoadOptions(speculative="ngram"), "--speculative is not used by the vllm backend"),
        ("transformers", LoadOptions(kv_layout="split"), "--kv-layout is not used by the transformers backend"),
    ],
)
def test_a_flag_the_backend_does_not_use_is_refused_naming_it(backend, options, message) -> None:
    with pytest.raises(EngineError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        backend_kwargs(options, backend, backends()[backend].options)


def test_load_engine_refuses_before_loading_anything(monkeypatch) -> None:
    from dataclasses import replace

    from tandemlm.deploy import registry

    def loaded(*_: object, **__: object) -> None:
        pytest.fail("the model was loaded")

    monkeypatch.setitem(registry._BACKENDS, "transformers", replace(backends()["transformers"], load=loaded))
    with pytest.raises(EngineError, match="--n-gpu-layers is not used by the transformers backend"):
        load_engine("smollm2", "transformers", LoadOptions(n_gpu_layers=3))


def test_the_cli_refuses_an_unused_flag_in_one_line() -> None:
    result = CliRunner().invoke(app, ["generate", "smollm2", "Hi", "--backend", "transformers", "--n-gpu-layers", "3"])
    assert result.exit_code != 0
    assert result.output.strip() == "error: --n-gpu-layers is not used by the transformers backend (it takes --n-parallel, --dtype)"


def test_llamacpp_maps_the_prompt_cache_and_speculative_flags_onto_its_own_names() -> None:
    options = LoadOptions(cache_ram=256, speculative="ngram")
    assert backend_kwargs(options, "llama.cpp", backends()["llama.cpp"].options) == {"cache_ram_mib": 256, "speculative": "ngram"}
