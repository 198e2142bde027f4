"""Folders and files that appear whole or not at all: built in a temp name beside the target, then renamed."""

from __future__ import annotations

import os
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


def replace_dir(staging: Path, target: Path) -> None:
    """Moves a finished ``staging`` folder to ``target``, replacing any old one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def unwritable_reason(folder: Path) -> str | None:
    """Why ``folder`` (made if missing) cannot receive files, naming the path at fault; None when it can.

    Walks up to the nearest existing ancestor: a file there (``file.txt/run``) or a folder without
    write permission (``os.access`` also reports a read-only filesystem) blocks every write below it.
    """
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"cannot write to {path} (read-only or no permission)"
    return None
