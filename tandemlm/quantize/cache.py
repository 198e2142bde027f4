"""Content-addressed cache of conversions and quantizations, its temp folder and result publishing.

A model's *content key* hashes every file of its HF folder (weights, config, tokenizer, chat
template), the adapter's files when one is merged, the llama.cpp version and :data:`RECIPE`;
one folder per key holds the f16 intermediate and each verified quant type::

    cache_dir()/quantize/<key>/
        source.json          what the key was made from (for people reading the cache)
        f16.gguf             stage 1 output, reused by every quant type of this model
        Q4_K_M.gguf          verified result, published only after the verify stage
        Q4_K_M.json          its verification record (fallbacks, checks); written before the GGUF
    cache_dir()/quantize/tmp/
        <pid>-<name>.<random>.partial   files being written, named by the process writing them

A run removes its own temp files on every exit it sees (an error, Ctrl-C, SIGTERM); after a
``kill -9`` the next run sweeps the files whose owner PID is no longer alive.

File digests are remembered by (path, size, mtime), so asking again for a multi-GB checkpoint does
not re-read it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tandemlm.models.builtin import cache_dir
from tandemlm.storage.atomic import atomic_path, atomic_write_text

RECIPE = 1  # bump when a stage changes its output for the same input
SKIP_FILES = ("README.md", ".gitattributes")  # top-level files that do not shape the GGUF
DIGESTS_FILE = "digests.json"
TEMP_FOLDER = "tmp"  # in-progress files of every run, named <pid>-...; see sweep_stale_temps


def quantize_cache_root() -> Path:
    """``cache_dir()/quantize``: where intermediates and verified results live."""
    root = cache_dir() / "quantize"
    root.mkdir(parents=True, exist_ok=True)
    return root


def folder_digest(folder: Path) -> str:
    """sha256 over the names and contents of a model folder's top-level files (hidden files skipped)."""
    memo = _DigestMemo(quantize_cache_root() / DIGESTS_FILE)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in SKIP_FILES:
            continue
        digest.update(f"{path.name}\0{memo.file_digest(path)}\n".encode())
    memo.save()
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of one file, remembered by (path, size, mtime)."""
    memo = _DigestMemo(quantize_cache_root() / DIGESTS_FILE)
    value = memo.file_digest(path)
    memo.save()
    return value


def content_key(parts: dict[str, Any]) -> str:
    """Short key of everything that shapes a result (digests, llama.cpp version, recipe)."""
    payload = json.dumps({"recipe": RECIPE, **parts}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class _DigestMemo:
    """A JSON map (path, size, mtime_ns) → sha256 so unchanged files are not re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changed = False
        try:
            self.entries: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in self.entries:
            with path.open("rb") as handle:
                self.entries[key] = hashlib.file_digest(handle, "sha256").hexdigest()
            self.changed = True
        return self.entries[key]

    def save(self) -> None:
        if self.changed:
            atomic_write_text(self.path, json.dumps(self.entries, indent=0))
            self.changed = False


# ---------------------------------------------------------------------------------------------
# Temp files of runs (the atomic writers themselves live in models/atomic.py)


def temp_folder(root: Path | None = None) -> Path:
    """``<root>/tmp`` (``root`` defaults to :func:`quantize_cache_root`): where runs write files in progress."""
    folder = (root or quantize_cache_root()) / TEMP_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Removes the entries of ``folder`` whose owner (the ``<pid>-`` of their name) is no longer alive.

    A run killed with SIGKILL (or by a power cut) runs no cleanup; its temp files, up to the size
    of a whole model, would otherwise stay forever. Entries of live processes and names without a
    PID are kept. Returns what was removed.
    """
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        owner, dash, _ = path.name.partition("-")
        if not dash or not owner.isdigit() or pid_alive(int(owner)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (possibly another user's); a reused PID reads as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_copy(source: Path, final: Path) -> Path:
    """Puts ``source``'s bytes at ``final`` atomically: a hard link when possible, else a copy."""
    if final.exists() and final.resolve() == source.resolve():
        return final
    with atomic_path(final) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)  # same filesystem: no second copy of a multi-GB file
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            shutil.copyfile(source, tmp)
    return final
