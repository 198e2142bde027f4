"""llama.cpp's own HF→GGUF converter, fetched by package name and cached.

The llama-cpp-python wheel carries no converter; its sdist does (``vendor/llama.cpp``). We fetch the
sdist of the *installed* llama-cpp-python with pip, keep only the pieces below, and run the
converter as a subprocess against its own bundled ``gguf-py`` (the PyPI ``gguf`` lags behind it).

Cached layout, ``cache_dir()/llama.cpp-<version>/`` (the ``vendor/llama.cpp`` tree, trimmed)::

    convert_hf_to_gguf.py   conversion/   gguf-py/gguf/   LICENSE
    models/templates/*.jinja            real chat templates (DeepSeek-R1-Distill, Qwen, ...)
    models/ggml-vocab-*.gguf            vocab-only GGUFs (real tokenizers, no weights)
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tandemlm.errors import EngineError
from tandemlm.models.atomic import publish_folder
from tandemlm.models.builtin import cache_dir
from tandemlm.models.resolve import WEIGHT_PATTERNS

if TYPE_CHECKING:
    from rich.text import Text

PACKAGE = "llama-cpp-python"
VENDOR_PREFIX = "vendor/llama.cpp/"
SDIST_ENV = "TANDEM_LLAMA_CPP_SDIST"  # a local sdist .tar.gz to use instead of downloading
MARKER = ".tandemlm-source"  # written last inside the staging folder; its presence means "complete"

# What we keep from vendor/llama.cpp, as path prefixes (a trailing / keeps the whole folder).
KEEP_PREFIXES: tuple[str, ...] = (
    "convert_hf_to_gguf.py",  # the converter's entry point
    "conversion/",  # its per-architecture model classes (imported by the entry point)
    "gguf-py/gguf/",  # the gguf package it is written against
    "models/templates/",  # real chat templates
    "LICENSE",  # MIT; travels with the copied code
)
KEEP_PATTERNS: tuple[re.Pattern[str], ...] = (re.compile(r"^models/ggml-vocab-[\w.-]+\.gguf$"),)

# --outtype values of convert_hf_to_gguf.py, one row each.
OUTTYPES: dict[str, str] = {
    "f32": "float32, lossless; the reference for comparing against HF fp32",
    "f16": "float16; the usual input to llama.cpp's k-quant quantizer",
    "bf16": "bfloat16; keeps fp32's range",
    "q8_0": "8-bit round-to-nearest, done by the converter itself",
}

_ERROR_LINE = re.compile(r"^(ERROR\b|\w*(Error|Exception)\b)")
_UNSUPPORTED = re.compile(r"Model (?P<arch>\S+) is not supported|Architecture '(?P<arch2>[^']+)' not supported")


class ConversionError(EngineError):
    """Fetching llama.cpp's sources or converting a checkpoint failed; the message is one line."""


def llama_cpp_version() -> str:
    """Version of the installed llama-cpp-python (the sdist we fetch must match the compiled library)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(f"{PACKAGE} is not installed: pip install {PACKAGE}") from None


def llama_cpp_source(version: str | None = None) -> Path:
    """Folder with llama.cpp's converter, gguf-py, chat templates and vocab GGUFs for ``version``.

    Defaults to the installed llama-cpp-python's version. Fetched once (``pip download`` of the
    sdist, about 77 MB) and cached under ``cache_dir()/llama.cpp-<version>/``; built in a temp
    folder and renamed, so an interrupted run leaves nothing half-made.
    """
    version = version or llama_cpp_version()
    target = cache_dir() / f"llama.cpp-{version}"
    if (target / MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        sdist = _find_or_download_sdist(version, Path(tmp) / "download")
        staging = Path(tmp) / "staging"
        _extract(sdist, staging)
        (staging / MARKER).write_text(f"{PACKAGE}=={version}\n{sdist.name}\n")
        publish_folder(staging, target, MARKER)
    return target


def vocab_gguf(name: str, version: str | None = None) -> Path:
    """A vocab-only GGUF from llama.cpp's ``models/`` folder, by name (``qwen2`` → ggml-vocab-qwen2.gguf)."""
    models = llama_cpp_source(version) / "models"
    path = models / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        known = sorted(p.name[len("ggml-vocab-") : -len(".gguf")] for p in models.glob("ggml-vocab-*.gguf"))
        raise ConversionError(f"no vocab GGUF {path.name} in {models}; known: {', '.join(known)}")
    return path


def chat_template(name: str, version: str | None = None) -> str:
    """A chat template from llama.cpp's ``models/templates/`` folder, by file stem."""
    templates = llama_cpp_source(version) / "models" / "templates"
    path = templates / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in templates.glob("*.jinja"))
        raise ConversionError(f"no chat template {path.name} in {templates}; known: {', '.join(known)}")
    return path.read_text(encoding="utf-8")


def supported_architectures(version: str | None = None) -> frozenset[str] | None:
    """HF architecture names (``LlamaForCausalLM``, ...) llama.cpp's converter can convert to text GGUF.

    Read from the converter's own registry without importing it (that would import torch);
    ``None`` if a future layout of that file cannot be read.
    """
    path = llama_cpp_source(version) / "conversion" / "__init__.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "TEXT_MODEL_MAP" in _assigned_names(node):
            try:
                return frozenset(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def convert_hf_to_gguf(hf_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], outtype: str = "f16") -> Path:
    """Converts an HF checkpoint folder to one GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    ``outtype`` is one of :data:`OUTTYPES`. The converter writes to a temp file beside
    ``out_path`` that is renamed only on success; on failure nothing is left at ``out_path`` and
    :class:`ConversionError` carries the converter's last error line.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; known: {', '.join(OUTTYPES)}")
    _check_architecture(hf_dir)
    if not any(any(hf_dir.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ConversionError(f"{hf_dir} has no weights (*.safetensors or pytorch_model*.bin) to convert")
    if out_path.is_dir():
        raise ConversionError(f"{out_path} is a folder; give the path of the .gguf file to write")
    source = llama_cpp_source()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_dir)]
        command += ["--outfile", str(tmp), "--outtype", outtype]
        code, lines = _run_with_status(command, _converter_env(source), f"Converting {hf_dir.name} to {outtype} GGUF")
        if code != 0:
            raise ConversionError(_failure_message(hf_dir, lines, code))
        _check_gguf_written(tmp, hf_dir)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


# ---------------------------------------------------------------------------------------------
# Fetching and unpacking the sdist


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
    code, lines = _run_with_status(command, None, f"Fetching the {PACKAGE} {version} sdist for llama.cpp's converter")
    found = sorted(dest.glob("*.tar.gz"))
    if code != 0 or not found:
        raise ConversionError(f"could not download the {PACKAGE}=={version} sdist: {_last_error(lines)}")
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
# Running the converter


def _check_architecture(hf_dir: Path) -> None:
    """Fails fast, before the converter's seconds of imports, on an architecture it does not know."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{config_path} is not valid JSON: {exc}") from None
    # The converter takes architectures[0], or text_config's for multimodal checkpoints.
    names = [arch for cfg in (config, config.get("text_config") or {}) for arch in (cfg.get("architectures") or [])[:1]]
    known = supported_architectures()
    if names and known is not None and not known.intersection(names):
        raise ConversionError(_unsupported_message(hf_dir, names[0]))


def _assigned_names(node: ast.AnnAssign | ast.Assign) -> list[str]:
    targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _unsupported_message(hf_dir: Path, arch: str) -> str:
    return (
        f"{hf_dir}/config.json: architecture {arch} is not supported by llama.cpp's converter "
        f"({PACKAGE} {llama_cpp_version()})"
    )


def _converter_env(source: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its bundled gguf-py, not PyPI's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source / "gguf-py"), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"  # it reads the tokenizer with transformers; never reach for the hub
    env["PYTHONUNBUFFERED"] = "1"  # so the progress line follows the converter
    return env


def _run_with_status(command: list[str], env: dict[str, str] | None, title: str) -> tuple[int, list[str]]:
    """Runs ``command``, showing a spinner with its latest output line; returns (exit code, lines)."""
    from rich.console import Console

    console = Console(stderr=True)
    width = console.width - 2  # the spinner and its space
    lines: list[str] = []
    with console.status(_status_text(title, "", width)) as status:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
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
                process.kill()
                process.wait()


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


def _last_error(lines: list[str]) -> str:
    """The most telling line of a failed run: its last error line, else its last line."""
    for line in reversed(lines):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _failure_message(hf_dir: Path, lines: list[str], code: int) -> str:
    for line in reversed(lines):
        if match := _UNSUPPORTED.search(line):
            return _unsupported_message(hf_dir, match.group("arch") or match.group("arch2"))
    return f"converting {hf_dir} to GGUF failed (exit {code}): {_last_error(lines)}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_gguf_written(path: Path, hf_dir: Path) -> None:
    """The converter exits 0 when it finds no weights, writing a GGUF with no tensors; refuse that."""
    with path.open("rb") as handle:
        header = handle.read(16)  # magic, u32 version, u64 tensor count
    if header[:4] != b"GGUF" or len(header) < 16:
        raise ConversionError(f"converting {hf_dir} to GGUF produced no GGUF file ({path.stat().st_size} bytes)")
    if struct.unpack("<Q", header[8:16])[0] == 0:
        raise ConversionError(f"converting {hf_dir} to GGUF wrote no tensors: are its weights in a format it reads?")
