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

from tandemlm.errors import EngineError, QuantizeError
from tandemlm.models.adapter_files import check_recorded_base, read_adapter_config
from tandemlm.models.lora_merge import AdapterMismatch, merge_lora
from tandemlm.storage.atomic import staging_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")
DONE_MARKER = "tandemlm_merged.json"  # written last: its presence marks a complete merge


def checked_adapter(adapter_dir: Path, base_dir: Path | None = None) -> dict[str, Any]:
    """The adapter's config, checked against ``base_dir`` when given; a QuantizeError line when it does not fit."""
    try:
        config = read_adapter_config(adapter_dir)
        if base_dir is not None:
            check_recorded_base(adapter_dir, config, base_dir)
    except EngineError as exc:
        raise QuantizeError(str(exc)) from None
    return config


def merge_adapter(base_dir: Path, adapter_dir: Path, target: Path) -> Path:
    """Writes base + adapter, merged, as a plain HF folder at ``target`` (temp folder + rename)."""
    if (target / DONE_MARKER).is_file():
        return target
    checked_adapter(adapter_dir, base_dir)
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

