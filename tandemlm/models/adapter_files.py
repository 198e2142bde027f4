"""LoRA adapter folders as files: where their weights are, safetensors only (pickle is refused)."""

from __future__ import annotations

from pathlib import Path

from tandemlm.errors import EngineError


def adapter_weights(path: str | Path) -> Path:
    """The safetensors weights of the LoRA adapter folder ``path``; pickle (``adapter_model.bin``) is refused."""
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise EngineError(f"{folder} is not a PEFT adapter folder (adapter_config.json is missing)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        why = "holds adapter_model.bin (pickle, not loaded); re-save it with safe_serialization=True" if pickled else "has no adapter_model.safetensors"
        raise EngineError(f"adapter {folder} {why}")
    return weights
