"""The weight files of an HF checkpoint folder: one definition of which files hold the weights.

Resolving a model, converting it to GGUF, estimating its size and choosing where to merge it all
ask which files are weights; safetensors first, pickle checkpoints (``pytorch_model*.bin``) counted
where a size is wanted (loading them is refused or guarded elsewhere, see ``pickle_guard``).
"""

from __future__ import annotations

from pathlib import Path

SAFETENSORS_PATTERN = "*.safetensors"
WEIGHT_PATTERNS = (SAFETENSORS_PATTERN, "pytorch_model*.bin", "model*.bin")


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files directly in ``folder`` (safetensors and ``*model*.bin``), each once, sorted."""
    root = Path(folder)
    return sorted({path for pattern in WEIGHT_PATTERNS for path in root.glob(pattern) if path.is_file()})


def safetensors_files(folder: str | Path) -> list[Path]:
    """The ``*.safetensors`` files directly in ``folder``, sorted."""
    return sorted(path for path in Path(folder).glob(SAFETENSORS_PATTERN) if path.is_file())


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in ``folder``; 0 when it has none (or is not a folder)."""
    return sum(path.stat().st_size for path in weight_files(folder))
