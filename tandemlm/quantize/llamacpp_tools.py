"""llama.cpp's own HF→GGUF converter, run from llama.cpp's sources (fetched and cached by
:mod:`tandemlm.llamacpp.sources`, shared with deploy's LoRA converter).

Cached layout, ``cache_dir()/llama.cpp-<version>/``: see :mod:`tandemlm.llamacpp.sources`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import sys
from pathlib import Path

from tandemlm.llamacpp.sources import (  # re-exported: quantize's callers and tests use them from here
    MARKER,
    PACKAGE,
    SDIST_ENV,
    ConversionError,
    llama_cpp_source,
    llama_cpp_version,
)
from tandemlm.llamacpp.sources import converter_env as _converter_env
from tandemlm.llamacpp.sources import last_error as _last_error
from tandemlm.llamacpp.sources import run_with_status as _run_with_status
from tandemlm.models.weight_files import weight_files
from tandemlm.storage.atomic import atomic_path

__all__ = ["MARKER", "PACKAGE", "SDIST_ENV", "ConversionError", "llama_cpp_source", "llama_cpp_version"]

# --outtype values of convert_hf_to_gguf.py, one row each.
OUTTYPES: dict[str, str] = {
    "f32": "float32, lossless; the reference for comparing against HF fp32",
    "f16": "float16; the usual input to llama.cpp's k-quant quantizer",
    "bf16": "bfloat16; keeps fp32's range",
    "q8_0": "8-bit round-to-nearest, done by the converter itself",
}

_UNSUPPORTED = re.compile(r"Model (?P<arch>\S+) is not supported|Architecture '(?P<arch2>[^']+)' not supported")


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


def convert_hf_to_gguf(
    hf_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], outtype: str = "f16", temp_dir: Path | None = None
) -> Path:
    """Converts an HF checkpoint folder to one GGUF file with llama.cpp's ``convert_hf_to_gguf.py``.

    ``outtype`` is one of :data:`OUTTYPES`. The converter writes to a temp file (beside ``out_path``,
    or named by our PID in ``temp_dir`` on the same filesystem) that is renamed only on success;
    on failure or interruption the converter is killed, the temp file removed, nothing is left at
    ``out_path``, and :class:`ConversionError` carries the converter's last error line.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; known: {', '.join(OUTTYPES)}")
    _check_architecture(hf_dir)
    if not weight_files(hf_dir):
        raise ConversionError(f"{hf_dir} has no weights (*.safetensors or pytorch_model*.bin) to convert")
    if out_path.is_dir():
        raise ConversionError(f"{out_path} is a folder; give the path of the .gguf file to write")
    source = llama_cpp_source()
    with atomic_path(out_path, ".partial", temp_dir) as tmp:
        command = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(hf_dir)]
        command += ["--outfile", str(tmp), "--outtype", outtype]
        code, lines = _run_with_status(command, _converter_env(source), f"Converting {hf_dir.name} to {outtype} GGUF")
        if code != 0:
            raise ConversionError(_failure_message(hf_dir, lines, code))
        _check_gguf_written(tmp, hf_dir)
    return out_path


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


def _failure_message(hf_dir: Path, lines: list[str], code: int) -> str:
    for line in reversed(lines):
        if match := _UNSUPPORTED.search(line):
            return _unsupported_message(hf_dir, match.group("arch") or match.group("arch2"))
    return f"converting {hf_dir} to GGUF failed (exit {code}): {_last_error(lines)}"


def _check_gguf_written(path: Path, hf_dir: Path) -> None:
    """The converter exits 0 when it finds no weights, writing a GGUF with no tensors; refuse that."""
    with path.open("rb") as handle:
        header = handle.read(16)  # magic, u32 version, u64 tensor count
    if header[:4] != b"GGUF" or len(header) < 16:
        raise ConversionError(f"converting {hf_dir} to GGUF produced no GGUF file ({path.stat().st_size} bytes)")
    if struct.unpack("<Q", header[8:16])[0] == 0:
        raise ConversionError(f"converting {hf_dir} to GGUF wrote no tensors: are its weights in a format it reads?")
