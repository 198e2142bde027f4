"""LoRA adapter folders as files: their config (one reader for every backend and the merge), where their
weights are (safetensors only: pickle is refused), and whether they fit a base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandemlm.errors import EngineError

ADAPTER_CONFIG = "adapter_config.json"
# config.json fields that must agree between the adapter's recorded base and the given base.
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def read_adapter_config(adapter_dir: str | Path, flag: str = "--adapter") -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; a folder that is not a LoRA adapter fails in one line naming ``flag``."""
    adapter_dir = Path(adapter_dir).expanduser()
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise EngineError(f"{flag} {adapter_dir} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise EngineError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise EngineError(f"{path}: peft_type is {kind!r}; only LoRA adapters are supported")
    return config


def check_recorded_base(adapter_dir: Path, adapter_config: dict[str, Any], base_dir: Path) -> None:
    """Fails when the adapter names a local base folder whose shapes differ from ``base_dir``'s."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded or not (Path(str(recorded)) / "config.json").is_file():
        return  # a hub id or a path from another machine: the shape check of the merge or load decides
    theirs = json.loads((Path(str(recorded)) / "config.json").read_text())
    ours = json.loads((base_dir / "config.json").read_text())
    differing = [f"{key} {theirs.get(key)} vs {ours.get(key)}" for key in SHAPE_FIELDS if theirs.get(key) != ours.get(key)]
    if differing:
        raise EngineError(
            f"--adapter {adapter_dir} was trained on {recorded}, which does not match {base_dir} ({'; '.join(differing)})"
        )


def adapter_weights(path: str | Path) -> Path:
    """The safetensors weights of the LoRA adapter folder ``path``; pickle (``adapter_model.bin``) is refused."""
    folder = Path(path).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise EngineError(f"{folder} is not a PEFT adapter folder ({ADAPTER_CONFIG} is missing)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        why = "holds adapter_model.bin (pickle, not loaded); re-save it with safe_serialization=True" if pickled else "has no adapter_model.safetensors"
        raise EngineError(f"adapter {folder} {why}")
    return weights
