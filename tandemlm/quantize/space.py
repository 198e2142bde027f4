"""Disk space: how much a run will write, a check before it starts, and the disk-full one-liner.

A full disk mid-conversion otherwise surfaces as a traceback from deep inside numpy or the
converter; checking first (with llama.cpp's own size arithmetic) fails before anything is written.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

from tandemlm.errors import QuantizeError
from tandemlm.models.weight_files import safetensors_files, weight_files
from tandemlm.quantize.quant_types import QuantType

HEADROOM = 1.05  # metadata, tokenizer and alignment padding on top of the tensor bytes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def count_params(folder: Path) -> int:
    """Weights in an HF folder, from the safetensors headers (no tensor data read)."""
    total = 0
    for path in safetensors_files(folder):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    if total == 0:  # pickle checkpoints: assume 16-bit weights
        total = sum(p.stat().st_size for p in weight_files(folder) if p.suffix == ".bin") // 2
    return total


def gguf_bytes(n_params: int, bits: float) -> int:
    """Expected size of a GGUF holding ``n_params`` weights at ``bits`` per weight."""
    return int(n_params * bits / 8 * HEADROOM)


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Fails in one line when ``folder``'s filesystem has less than ``needed`` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise QuantizeError(f"not enough disk space in {folder} for {what}: about {_gb(needed)} needed, {_gb(free)} free")


def planned_bytes(n_params: int, qtype: QuantType, intermediate: QuantType | None) -> int:
    """Bytes a run writes: the stage-1 GGUF (``intermediate``, None when cached) plus the result.

    A quantized result is bounded by 8.5 bits per weight: llama.cpp's k-quant mixes and
    fallbacks never go above q8_0 (1-D tensors stay f32, a rounding error on the total).
    Convert-stage types are the stage-1 file itself, linked rather than copied.
    """
    result = 0 if qtype.stage == "convert" else gguf_bytes(n_params, max(qtype.bits, 8.5))
    return result + (gguf_bytes(n_params, intermediate.bits) if intermediate is not None else 0)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC, raised directly or reported by the converter subprocess."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc)


def disk_full_error(where: Path, stage: str) -> QuantizeError:
    """The one-line error for a disk that filled up during ``stage``."""
    free = shutil.disk_usage(where if where.is_dir() else where.parent).free if where.parent.exists() else 0
    return QuantizeError(f"disk full during the {stage} stage while writing under {where} ({_gb(free)} free); free some space and rerun")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
