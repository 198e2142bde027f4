"""Merges a LoRA adapter into its base model (peft ``merge_and_unload``) before conversion.

llama.cpp's converter reads plain HF checkpoints; a GGUF made from the base alone silently drops
the fine-tune. Merging first, into a cached HF folder, makes the adapter part of the weights.
An adapter that does not fit the base fails in one line before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tandemlm.errors import QuantizeError
from tandemlm.models.atomic import staging_folder
from tandemlm.models.lora_merge import AdapterMismatch, merge_lora

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
# config.json fields that must agree between the adapter's recorded base and the given base.
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
DONE_MARKER = "tandemlm_merged.json"  # written last: its presence marks a complete merge


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``; a folder that is not a LoRA adapter fails in one line."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise QuantizeError(f"--adapter {adapter_dir} is not a PEFT adapter folder: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise QuantizeError(f"{path} is not valid JSON: {exc}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise QuantizeError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged")
    return config


def check_recorded_base(adapter_dir: Path, adapter_config: dict[str, Any], base_dir: Path) -> None:
    """Fails when the adapter names a local base folder whose shapes differ from ``base_dir``'s."""
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded or not (Path(str(recorded)) / "config.json").is_file():
        return  # a hub id or a path from another machine: the shape check in merge_adapter decides
    theirs = json.loads((Path(str(recorded)) / "config.json").read_text())
    ours = json.loads((base_dir / "config.json").read_text())
    differing = [f"{key} {theirs.get(key)} vs {ours.get(key)}" for key in SHAPE_FIELDS if theirs.get(key) != ours.get(key)]
    if differing:
        raise QuantizeError(
            f"--adapter {adapter_dir} was trained on {recorded}, which does not match {base_dir} ({'; '.join(differing)})"
        )


def merge_adapter(base_dir: Path, adapter_dir: Path, target: Path) -> Path:
    """Writes base + adapter, merged, as a plain HF folder at ``target`` (temp folder + rename)."""
    if (target / DONE_MARKER).is_file():
        return target
    adapter_config = read_adapter_config(adapter_dir)
    check_recorded_base(adapter_dir, adapter_config, base_dir)
    try:
        merged = merge_lora(base_dir, adapter_dir)
    except AdapterMismatch as exc:
        raise QuantizeError(f"--{exc}") from None  # "--adapter X does not fit Y: ...", naming the flag
    # An unmarked target is an interrupted run's leftover: replaced; a marked one another run made: kept.
    with staging_folder(target, marker=DONE_MARKER) as staging:
        _copy_side_files(base_dir, adapter_dir, staging)
        merged.save_pretrained(staging, safe_serialization=True)
        (staging / DONE_MARKER).write_text(json.dumps({"base": str(base_dir), "adapter": str(adapter_dir)}) + "\n")
    return target


def _copy_side_files(base_dir: Path, adapter_dir: Path, staging: Path) -> None:
    """Tokenizer, chat template and generation config from the base; the adapter's tokenizer files win."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != "config.json":
            shutil.copy2(path, staging / path.name)
    for name in TOKENIZER_FILES:  # training may have set a chat template or special tokens
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, staging / name)

