"""Folders that appear whole or not at all: built in a temp folder beside the target, then renamed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any


def publish_folder(staging: Path, target: Path, marker: str) -> None:
    """Renames the finished ``staging`` folder to ``target``, whose ``marker`` file means "complete".

    An unmarked ``target`` is an interrupted leftover and is replaced; if a concurrent builder
    renamed a marked one into place first, theirs is as good and ours is dropped by the caller.
    """
    if target.exists() and not (target / marker).is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not (target / marker).is_file():
            raise


def save_hf_folder(model: Any, tokenizer: Any, target: Path) -> Path:
    """Saves ``model`` (safetensors) and ``tokenizer`` to ``target``, replacing it only once both are written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
