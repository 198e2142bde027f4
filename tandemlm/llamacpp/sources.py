"""llama.cpp's Python sources (its converters and gguf-py), fetched by package name and cached.

The llama-cpp-python wheel carries no converter; its sdist does (``vendor/llama.cpp``). We fetch the
sdist of the *installed* llama-cpp-python with pip, keep only the pieces below, and run the
converters as subprocesses against their own bundled ``gguf-py`` (the PyPI ``gguf`` lags behind it).
Shared ground: quantize runs ``convert_hf_to_gguf.py``, deploy runs ``convert_lora_to_gguf.py``.

Cached layout, ``cache_dir()/llama.cpp-<version>/`` (the ``vendor/llama.cpp`` tree, trimmed)::

    convert_hf_to_gguf.py   convert_lora_to_gguf.py   conversion/   gguf-py/gguf/   LICENSE
    models/templates/*.jinja            real chat templates (DeepSeek-R1-Distill, Qwen, ...)
    models/ggml-vocab-*.gguf            vocab-only GGUFs (real tokenizers, no weights)
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tandemlm.errors import EngineError
from tandemlm.models.builtin import cache_dir
from tandemlm.storage.atomic import publish_folder, replace_dir

if TYPE_CHECKING:
    from rich.text import Text

PACKAGE = "llama-cpp-python"
VENDOR_PREFIX = "vendor/llama.cpp/"
SDIST_ENV = "TANDEM_LLAMA_CPP_SDIST"  # a local sdist .tar.gz to use instead of downloading
MARKER = ".tandemlm-source"  # written last inside the staging folder; its presence means "complete"
# Bumped when KEEP_PREFIXES grows: a cache kept under an older list is rebuilt once (version 2 added
# convert_lora_to_gguf.py).
KEEP_VERSION = 2

# What we keep from vendor/llama.cpp, as path prefixes (a trailing / keeps the whole folder).
KEEP_PREFIXES: tuple[str, ...] = (
    "convert_hf_to_gguf.py",  # the converter's entry point
    "convert_lora_to_gguf.py",  # PEFT LoRA adapters to GGUF LoRA (imports conversion/)
    "conversion/",  # its per-architecture model classes (imported by the entry point)
    "gguf-py/gguf/",  # the gguf package it is written against
    "models/templates/",  # real chat templates
    "LICENSE",  # MIT; travels with the copied code
)
KEEP_PATTERNS: tuple[re.Pattern[str], ...] = (re.compile(r"^models/ggml-vocab-[\w.-]+\.gguf$"),)

_ERROR_LINE = re.compile(r"^(ERROR\b|\w*(Error|Exception)\b)")


class ConversionError(EngineError):
    """Fetching llama.cpp's sources or converting a checkpoint failed; the message is one line."""


def llama_cpp_version() -> str:
    """Version of the installed llama-cpp-python (the sdist we fetch must match the compiled library)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"{PACKAGE} is not installed: pip install {PACKAGE}") from None


def llama_cpp_source(version: str | None = None) -> Path:
    """Folder with llama.cpp's converters, gguf-py, chat templates and vocab GGUFs for ``version``.

    Defaults to the installed llama-cpp-python's version. Fetched once (``pip download`` of the
    sdist, about 77 MB) and cached under ``cache_dir()/llama.cpp-<version>/``; built in a temp
    folder and renamed, so an interrupted run leaves nothing half-made.
    """
    version = version or llama_cpp_version()
    target = cache_dir() / f"llama.cpp-{version}"
    marker = target / MARKER
    stale = marker.is_file() and f"keep {KEEP_VERSION}" not in marker.read_text().splitlines()
    if marker.is_file() and not stale:
        return target
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        sdist = _find_or_download_sdist(version, Path(tmp) / "download")
        staging = Path(tmp) / "staging"
        _extract(sdist, staging)
        (staging / MARKER).write_text(f"{PACKAGE}=={version}\n{sdist.name}\nkeep {KEEP_VERSION}\n")
        # A complete cache kept under an older list is replaced; otherwise a concurrent builder's wins.
        if stale:
            replace_dir(staging, target)
        else:
            publish_folder(staging, target, MARKER)
    return target


def _find_or_download_sdist(version: str, dest: Path) -> Path:
    """The sdist tarball: ``$TANDEM_LLAMA_CPP_SDIST`` if set, else ``pip download`` into ``dest``."""
    if local := os.environ.get(SDIST_ENV):
        path = Path(local).expanduser()
        if not path.is_file():
            raise ConversionError(f"{SDIST_ENV}={local} does not exist")
        return path
    dest.mkdir(parents=True, exist_ok=True)
    # pip prepares the sdist's metadata (fetching its build backend): slower than a plain
    # download, but it is the registry's ordinary client and honours pip.conf / indexes.
    command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    command += ["--disable-pip-version-check", f"{PACKAGE}=={version}", "-d", str(dest)]
    code, lines = run_with_status(command, None, f"Fetching the {PACKAGE} {version} sdist for llama.cpp's converter")
    found = sorted(dest.glob("*.tar.gz"))
    if code != 0 or not found:
        raise ConversionError(f"could not download the {PACKAGE}=={version} sdist: {last_error(lines)}")
    return found[0]


def _wanted(relative: str) -> bool:
    return relative.startswith(KEEP_PREFIXES) or any(p.match(relative) for p in KEEP_PATTERNS)


def _extract(sdist: Path, staging: Path) -> None:
    """Extracts the wanted members of ``vendor/llama.cpp`` into ``staging`` (prefix stripped)."""
    found_converter = False
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            _, _, rest = member.name.partition("/")  # drop the sdist's top folder
            if not rest.startswith(VENDOR_PREFIX) or not member.isfile():
                continue
            relative = rest[len(VENDOR_PREFIX) :]
            if "__pycache__" in relative or not _wanted(relative):
                continue
            member.name = relative
            tar.extract(member, staging, filter="data")
            found_converter |= relative == "convert_hf_to_gguf.py"
    if not found_converter:
        raise ConversionError(f"{sdist.name} has no {VENDOR_PREFIX}convert_hf_to_gguf.py")


# ---------------------------------------------------------------------------------------------
# Running a converter


def converter_env(source: Path) -> dict[str, str]:
    """The environment a converter script from ``source`` runs in (its own gguf-py, no hub)."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its bundled gguf-py, not PyPI's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source / "gguf-py"), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"  # it reads the tokenizer with transformers; never reach for the hub
    env["PYTHONUNBUFFERED"] = "1"  # so the progress line follows the converter
    return env


def run_with_status(command: list[str], env: dict[str, str] | None, title: str) -> tuple[int, list[str]]:
    """Runs ``command``, showing a spinner with its latest output line; returns (exit code, lines).

    The child never outlives this call: on any exception (Ctrl-C, SystemExit from a SIGTERM
    handler, an error) its whole process group is killed, and on Linux the kernel kills it if
    this process dies without running Python code at all (``kill -9``).
    """
    from rich.console import Console

    console = Console(stderr=True)
    width = console.width - 2  # the spinner and its space
    lines: list[str] = []
    with console.status(_status_text(title, "", width)) as status:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            process_group=0,
            preexec_fn=_die_with_parent_hook(),
        )
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                if line := raw.rstrip():
                    lines.append(line)
                    status.update(_status_text(title, line, width))
            return process.wait(), lines
        finally:
            if process.poll() is None:  # interrupted: do not leave it writing behind our back
                _kill_process_group(process)


def _kill_process_group(process: subprocess.Popen[str]) -> None:
    """SIGKILLs ``process``'s group (it leads one: ``process_group=0``) and reaps it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the converter and anything it started
    except ProcessLookupError:
        pass
    process.wait()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when we die; ``None`` off Linux.

    Why: ``kill -9`` of ``tandem`` (or the OOM killer) runs no ``finally``, so the converter would
    go on as an orphan, writing a temp file as large as the model. ``PR_SET_PDEATHSIG`` asks the
    kernel to kill the child when the *thread* that forked it exits; :func:`run_with_status`
    blocks that thread until the child is done, so that is when this process dies. libc is loaded
    here, before the fork, so the child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL))
        if os.getppid() != parent:  # we died between fork and prctl: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _status_text(title: str, line: str, width: int) -> Text:
    """One spinner line: the title, then the latest output line dimmed, cut to ``width``."""
    from rich.text import Text

    if line.startswith(("INFO:", "WARNING:")):  # drop the logger prefix, e.g. INFO:hf-to-gguf:
        line = line.split(":", 2)[-1]
    text = Text(title)
    if line:
        text.append(": " + line, style="dim")
    text.truncate(width, overflow="ellipsis")  # the spinner wraps long text onto new lines otherwise
    return text


def last_error(lines: list[str]) -> str:
    """The most telling line of a failed run: its last error line, else its last line."""
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else "no output"
