"""Thread-count defaults: one llama.cpp thread per physical core this process may use."""

from __future__ import annotations

import psutil
import pytest
import torch

from tandemlm import hardware


@pytest.mark.parametrize(
    ("n_logical", "n_physical", "allowed", "expected"),
    [
        (2, 2, 2, 2),  # no hyperthreads (this CI machine)
        (16, 8, 16, 8),  # hyperthreads: one thread per core, not per sibling
        (16, 8, 4, 2),  # a container given a quarter of the CPUs
        (16, 8, 1, 1),  # never zero
    ],
)
def test_physical_cores_counts_cores_in_the_affinity_mask(monkeypatch, n_logical, n_physical, allowed, expected):
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: n_logical if logical else n_physical)
    monkeypatch.setattr(hardware, "usable_cpus", lambda: allowed)
    assert hardware.physical_cores() == expected


def test_llamacpp_engine_defaults_to_physical_cores(tiny_llama_gguf):
    import llama_cpp

    from tandemlm.deploy.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(str(tiny_llama_gguf), "tiny", n_ctx=256, n_parallel=2)
    try:
        assert engine.n_threads == hardware.physical_cores()
        assert llama_cpp.llama_n_threads(engine._ctx) == engine.n_threads
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("device", "dtype", "flash", "bf16", "checkpoint", "expected"),
    [
        ("cpu", "auto", False, False, None, ("float32", "sdpa")),
        ("cpu", "auto", True, False, "bfloat16", ("float32", "sdpa")),  # never half precision on CPU by default
        ("cpu", "bfloat16", True, False, None, ("bfloat16", "sdpa")),  # asked for: honoured, still no flash on CPU
        ("cuda", "auto", True, True, "float32", ("bfloat16", "flash_attention_2")),  # fp32 checkpoint goes 16-bit
        ("cuda", "auto", False, True, "float32", ("bfloat16", "sdpa")),
        ("cuda", "auto", True, False, None, ("float16", "flash_attention_2")),  # no bf16 on this GPU
        ("cuda", "auto", True, False, "bfloat16", ("float16", "flash_attention_2")),
        ("cuda", "auto", True, True, "float16", ("float16", "flash_attention_2")),  # a 16-bit checkpoint keeps its own
        ("cuda:1", "auto", True, True, "bfloat16", ("bfloat16", "flash_attention_2")),
        ("cuda", "float32", True, True, "bfloat16", ("float32", "sdpa")),  # FlashAttention-2 rejects fp32
        ("cuda", "float16", True, True, None, ("float16", "flash_attention_2")),
    ],
)
def test_pick_precision_table(device, dtype, flash, bf16, checkpoint, expected):
    assert hardware.pick_precision(device, dtype, flash, bf16, checkpoint) == expected


def test_pick_precision_names_the_flag_on_a_bad_dtype():
    with pytest.raises(ValueError, match="--dtype 'fp8'"):
        hardware.pick_precision("cpu", "fp8", False, False)


def test_inference_precision_on_this_cpu_machine(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert hardware.checkpoint_dtype(tmp_path) == "bfloat16"
    if torch.cuda.is_available():
        pytest.skip("checks the CPU side")
    assert hardware.inference_precision("auto", checkpoint=tmp_path) == hardware.Precision("cpu", "float32", "sdpa")
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU"):
        hardware.inference_precision("cuda")
    with pytest.raises(ValueError, match="--device 'tpu'"):
        hardware.inference_precision("tpu")
