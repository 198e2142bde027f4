"""Thread-count defaults: one llama.cpp thread per physical core this process may use."""

from __future__ import annotations

import psutil
import pytest

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
