"""Folders and files that appear whole or not at all: built in a temp name beside the target, then renamed.

The one home of atomic writes for every layer above (deploy, quantize, align, fixtures): a file
goes through :func:`atomic_path` (or :func:`atomic_write_text`), a folder through
:func:`staging_folder` (or :func:`publish_folder` / :func:`replace_dir` when the caller builds it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path_for(final: Path, suffix: str = ".partial", folder: Path | None = None) -> Path:
    """A fresh temp file for ``final``: hidden beside it, or ``<pid>-<name>.<random><suffix>`` in ``folder``.

    ``folder`` must be on ``final``'s filesystem (so renaming the file is atomic); naming the
    owner's PID lets ``quantize.cache.sweep_stale_temps`` tell a dead run's leftovers from a live run's work.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}." if folder is None else f"{os.getpid()}-{final.name}."
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder or final.parent)
    os.close(fd)
    return Path(name)


def make_world_readable(path: Path) -> None:
    """mkstemp makes 0600 files; give results the usual umask-based mode instead."""
    # os.umask both sets and returns: set 0 to read the current mask, then put it straight back.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(final: Path, suffix: str = ".partial", folder: Path | None = None) -> Iterator[Path]:
    """Yields a temp path for ``final`` (see :func:`temp_path_for`); renamed to ``final`` with the
    usual file mode if the block succeeds, else removed. A concurrent writer's result is replaced by ours."""
    tmp = temp_path_for(final, suffix, folder)
    try:
        yield tmp
        make_world_readable(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staging_folder(target: Path, marker: str | None = None) -> Iterator[Path]:
    """Yields a fresh hidden folder beside ``target``; when the block succeeds it becomes ``target``.

    Without ``marker`` an old ``target`` is replaced (:func:`replace_dir`); with one, a marked
    ``target`` that a concurrent builder published first is kept (:func:`publish_folder`). The
    staging folder is removed however the block ends.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if marker is None:
            replace_dir(staging, target)
        else:
            publish_folder(staging, target, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    with staging_folder(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
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
    """Writes ``text`` (UTF-8) to ``path`` via a temp file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
