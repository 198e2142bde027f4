"""LoRA adapters on the llama.cpp backend: PEFT folders converted to GGUF LoRA once, and per-adapter batching.

llama.cpp applies LoRA adapters per *context*, to every sequence of a ``llama_decode`` call, so a
scheduler step decodes only the sequences of one adapter (``None``: the base) and takes the adapters
in turns (:func:`next_group`), as llama-server does for requests with differing LoRA settings.

A PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) becomes a GGUF LoRA with
llama.cpp's own ``convert_lora_to_gguf.py`` from the cached llama.cpp sources. The script needs the
base model's HF config folder; the result is cached by the adapter files' content, so a second load
of the same adapter runs no converter::

    cache_dir()/lora-gguf/<key>.gguf     key: sha256 of the adapter's files and the llama.cpp version
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tandemlm.errors import EngineError
from tandemlm.llamacpp import sources as llamacpp_source
from tandemlm.models.adapter_files import ADAPTER_CONFIG, adapter_weights, read_adapter_config
from tandemlm.models.builtin import cache_dir
from tandemlm.storage.atomic import atomic_path

RECIPE = 1  # bump when the conversion below changes its output for the same adapter


def lora_gguf(path: str | Path, builtin_base: Callable[[], Path] | None = None) -> Path:
    """The GGUF LoRA of the PEFT adapter folder ``path``, converted on first use and cached.

    ``builtin_base`` gives the served built-in model's HF folder; it is asked only when the
    adapter's recorded base (``base_model_name_or_path``) is not a local folder.
    """
    weights = adapter_weights(path)
    folder = weights.parent
    config = _adapter_config(folder)
    target = cache_dir() / "lora-gguf" / f"{_content_key(folder, weights)}.gguf"
    if target.is_file():
        return target
    base = base_config_folder(folder, config, builtin_base)
    return _convert(folder, base, target)


def _adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's config, refused when llama.cpp would run it with other numbers than PEFT does."""
    config = read_adapter_config(folder, "adapter")
    if config.get("use_dora"):
        raise EngineError(f"adapter {folder}: DoRA adapters cannot be converted to GGUF LoRA; merge it instead")
    if config.get("use_rslora"):  # llama.cpp scales by alpha / r, rsLoRA by alpha / sqrt(r)
        raise EngineError(f"adapter {folder}: rsLoRA scaling is not what llama.cpp applies; merge it instead")
    return config


def base_config_folder(folder: Path, config: dict[str, Any], builtin_base: Callable[[], Path] | None) -> Path:
    """The base model's HF config folder that ``convert_lora_to_gguf.py --base`` needs."""
    recorded = config.get("base_model_name_or_path")
    if recorded and (Path(str(recorded)).expanduser() / "config.json").is_file():
        return Path(str(recorded)).expanduser()
    if builtin_base is not None:
        return builtin_base()
    raise EngineError(
        f"adapter {folder}: converting it to GGUF needs the base model's HF config folder, and its "
        f"{ADAPTER_CONFIG} records base_model_name_or_path={recorded!r}, not a local folder; set that to the base's HF folder"
    )


def _content_key(folder: Path, weights: Path) -> str:
    """Short key of what shapes the GGUF: the adapter's config and weights, llama.cpp's version, the recipe."""
    digest = hashlib.sha256(f"recipe {RECIPE}\0llama.cpp {llamacpp_source.llama_cpp_version()}\0".encode())
    for path in (folder / ADAPTER_CONFIG, weights):
        digest.update(f"{path.name}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def _convert(folder: Path, base: Path, target: Path) -> Path:
    """Runs ``convert_lora_to_gguf.py`` into a temp file beside ``target``, renamed only on success."""
    source = llamacpp_source.llama_cpp_source()
    script = source / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise EngineError(
            f"{source} has no convert_lora_to_gguf.py (llama-cpp-python {llamacpp_source.llama_cpp_version()})"
        )
    # Whole or not at all; a concurrent converter's result is as good as ours.
    with atomic_path(target) as tmp:
        command = [sys.executable, str(script), str(folder), "--base", str(base)]
        command += ["--outfile", str(tmp), "--outtype", "f32"]  # f32: adapters are small, keep them exact
        env = llamacpp_source.converter_env(source)
        code, lines = llamacpp_source.run_with_status(command, env, f"Converting adapter {folder.name} to GGUF LoRA")
        if code != 0 or tmp.stat().st_size == 0:
            raise EngineError(
                f"converting adapter {folder} to GGUF LoRA failed (exit {code}): {llamacpp_source.last_error(lines)}"
            )
    return target


def next_group(adapters: Iterable[str | None], last: str | None) -> str | None:
    """The adapter whose sequences the next decode step runs: the first after ``last`` in a fixed order.

    ``adapters`` are those of the requests with work (``None``: the base); ``last`` is the one the
    previous step ran (it may have no requests left). Taking them in turns means no adapter starves.
    """
    order = sorted(set(adapters), key=_rank)
    if not order:
        raise ValueError("no requests to pick from")
    later = [adapter for adapter in order if _rank(adapter) > _rank(last)]
    return later[0] if later else order[0]


def _rank(adapter: str | None) -> tuple[bool, str]:
    """Sort key: the base first, then adapters by name."""
    return (adapter is not None, adapter or "")
