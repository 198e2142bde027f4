"""Turns a model reference (folder, ``.gguf`` file, built-in name, hub id) into checked local files.

Resolution order: local HF folder, local ``.gguf`` file, built-in name, Hugging Face hub id.
Every failure is one line naming the path or field at fault.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from tandemlm.errors import EngineError
from tandemlm.models.builtin import BUILTIN_MODELS, builtin_gguf, builtin_hf_folder
from tandemlm.models.weight_files import weight_files

GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class ModelSource:
    """Local files for one model. ``kind`` is ``hf`` (a folder) or ``gguf`` (a file)."""

    model_id: str
    kind: str
    path: Path
    builtin: str | None = None
    trust_remote_code: bool = False

    def hf_folder(self) -> Path:
        """An HF folder for this model (materialised from the GGUF for built-ins)."""
        if self.kind == "hf":
            return self.path
        if self.builtin:
            return builtin_hf_folder(self.builtin)
        raise EngineError(
            f"{self.path} is a GGUF file; this backend needs a Hugging Face folder "
            "(use --backend llama.cpp for GGUF files)"
        )

    def gguf_file(self) -> Path:
        if self.kind == "gguf":
            return self.path
        raise EngineError(
            f"{self.path} is a Hugging Face folder; the llama.cpp backend needs a .gguf file "
            "(make one with: tandem quantize)"
        )


def resolve_model(ref: str | os.PathLike[str], trust_remote_code: bool = False) -> ModelSource:
    """Resolves a model reference to local files, checking them before any heavy load."""
    text = str(ref).strip()
    if not text:
        raise EngineError("model reference is empty")
    path = Path(text).expanduser()
    if path.is_dir():
        check_hf_folder(path, trust_remote_code)
        return ModelSource(model_id=path.name, kind="hf", path=path.resolve(), trust_remote_code=trust_remote_code)
    if path.is_file():
        check_gguf_file(path)
        return ModelSource(model_id=path.stem, kind="gguf", path=path.resolve())
    if text in BUILTIN_MODELS:
        return ModelSource(model_id=text, kind="gguf", path=builtin_gguf(text), builtin=text)
    if _looks_like_path(text):
        raise EngineError(f"model path {text} does not exist")
    return _resolve_hub(text, trust_remote_code)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") != 1


def check_hf_folder(path: Path, trust_remote_code: bool = False) -> None:
    """Fails with one line when a folder is not a loadable HF causal-LM checkpoint."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EngineError(f"{path} is not a Hugging Face model folder: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{config_path} is not valid JSON: {exc}") from None
    if not weight_files(path):
        raise EngineError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EngineError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if config.get("auto_map") and not trust_remote_code and not _is_known_model_type(config.get("model_type")):
        raise EngineError(
            f"{path} needs custom code from the checkpoint (config.json auto_map); "
            "pass --trust-remote-code only if you trust its author"
        )


def _is_known_model_type(model_type: str | None) -> bool:
    from transformers import CONFIG_MAPPING

    return bool(model_type) and model_type in CONFIG_MAPPING


def check_gguf_file(path: Path) -> None:
    """Fails with one line for a file that is not GGUF or is cut short."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(24)
    if len(header) < 4 or header[:4] != GGUF_MAGIC:
        raise EngineError(f"{path} is not a GGUF file (bad magic bytes)")
    if len(header) < 24:
        raise EngineError(f"{path} is a truncated GGUF file (header cut short)")
    version = struct.unpack("<I", header[4:8])[0]
    if version not in (2, 3):
        raise EngineError(f"{path} has unsupported GGUF version {version}")
    # A header walk, not gguf's GGUFReader: that one takes 10+ s on a real vocabulary.
    from tandemlm.models.gguf_info import read_gguf_info

    info = read_gguf_info(path)
    end = max((info.data_offset + t.offset + t.n_bytes for t in info.tensors), default=0)
    if end > size:
        raise EngineError(f"{path} is a truncated GGUF file ({size} bytes, tensor data runs past the end)")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_hub(repo_id: str, trust_remote_code: bool) -> ModelSource:
    """Downloads (or finds in the local HF cache) a hub checkpoint."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; try the network below
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            known = ", ".join(sorted(BUILTIN_MODELS))
            raise EngineError(
                f"model {repo_id!r} is not a local folder, .gguf file or built-in name ({known}), "
                "and the Hugging Face hub cannot be reached"
            ) from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"could not download {repo_id!r} from the hub: {exc}") from None
    path = Path(folder)
    check_hf_folder(path, trust_remote_code)
    return ModelSource(model_id=repo_id, kind="hf", path=path, trust_remote_code=trust_remote_code)
