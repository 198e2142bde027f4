"""Facts about this machine that pick thread counts (CPUs) and the inference device, dtype and attention (GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

SIXTEEN_BIT = ("bfloat16", "float16")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def has_cuda() -> bool:
    """True when torch sees a CUDA GPU (without importing torch when it is absent)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API on macOS and Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may use: hyperthread siblings share one core's matmul units.

    ggml's matmul threads gain nothing from a sibling hyperthread and lose at every barrier when
    one is parked, so llama.cpp's own tools run one thread per physical core.
    """
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or physical
    allowed = usable_cpus()
    # Scale to the affinity mask: a container given half the logical CPUs gets about half the cores.
    return max(1, min(allowed, round(physical * allowed / logical)))


def pick_precision(
    device: str, dtype: str, flash_attn: bool, bf16_supported: bool, checkpoint_dtype: str | None = None
) -> tuple[str, str]:
    """``(dtype, attention)`` for inference: a pure decision, tested over a table of cases.

    ``dtype`` "auto" on a CUDA device keeps a 16-bit checkpoint's own dtype and otherwise (fp32 or
    unknown) takes bf16, fp16 where the GPU lacks bf16; on CPU it is fp32, since half-precision
    matmuls there are slow or missing. FlashAttention-2 only runs 16-bit on CUDA, so it is picked
    only then (and only when installed); everything else gets PyTorch SDPA.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if dtype == "auto":
        if not cuda:
            dtype = "float32"
        elif checkpoint_dtype in SIXTEEN_BIT and (checkpoint_dtype != "bfloat16" or bf16_supported):
            dtype = checkpoint_dtype
        else:
            dtype = "bfloat16" if bf16_supported else "float16"
    attention = "flash_attention_2" if cuda and flash_attn and dtype in SIXTEEN_BIT else "sdpa"
    return dtype, attention


@dataclass(frozen=True)
class Precision:
    """Where and how a model runs for inference on this machine."""

    device: str  # "cpu" or "cuda[:N]"
    dtype: str  # a torch dtype name: "float32", "bfloat16", "float16"
    attention: str  # transformers' attn_implementation: "sdpa" or "flash_attention_2"

    def torch_dtype(self) -> object:
        """The ``torch.dtype`` for ``dtype``."""
        import torch

        return getattr(torch, self.dtype)


def inference_precision(device: str = "auto", dtype: str = "auto", checkpoint: str | os.PathLike[str] | None = None) -> Precision:
    """Device, dtype and attention for inference here: cuda + bf16/fp16 on a GPU, fp32 on CPU.

    ``device`` is "auto" (a CUDA GPU when there is one), "cpu" or "cuda[:N]"; ``checkpoint`` is an
    HF folder whose config.json dtype an "auto" dtype keeps when it is 16-bit.
    """
    import torch

    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    cuda_ok = bool(torch.cuda.is_available())
    if device.startswith("cuda") and not cuda_ok:
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if cuda_ok else "cpu"
    bf16 = device.startswith("cuda") and bool(torch.cuda.is_bf16_supported())
    flash = importlib.util.find_spec("flash_attn") is not None
    chosen, attention = pick_precision(device, dtype, flash, bf16, checkpoint_dtype(checkpoint) if checkpoint else None)
    return Precision(device, chosen, attention)


def checkpoint_dtype(folder: str | os.PathLike[str]) -> str | None:
    """The dtype an HF folder's config.json records (``dtype`` or the older ``torch_dtype``), if any."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return str(value) if value else None
