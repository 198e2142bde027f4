"""A LoRA adapter folded into its base weights: one merge for ``tandem merge`` and ``tandem quantize --adapter``.

The merge runs in fp32 (adding a low-rank product to bf16 weights rounds it away on small models)
and the result is cast back to the dtype the base checkpoint records, so a bf16 7B model stays
14 GB rather than 28. Saving the result is the caller's (each has its own side files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandemlm.hardware import checkpoint_dtype


class AdapterMismatch(ValueError):
    """The adapter does not fit the base (other shapes or module names); the message is one line."""


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, auto_class: Any = None, device: str = "cpu", **load: Any) -> Any:
    """The base model at ``base_dir`` with the adapter at ``adapter_dir`` merged in, in the base's own dtype.

    ``auto_class`` is the transformers auto class (default ``AutoModelForCausalLM``); ``load`` goes
    to its ``from_pretrained`` (e.g. ``num_labels=1`` for a reward model). Raises
    :class:`AdapterMismatch` when PEFT cannot apply the adapter to this base.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    auto = auto_class or AutoModelForCausalLM
    base = auto.from_pretrained(base_dir, dtype=torch.float32, device_map=device, **load)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterMismatch(f"adapter {adapter_dir} does not fit {base_dir}: {first_line(exc)}") from None
    merged = model.merge_and_unload()
    saved = getattr(torch, checkpoint_dtype(base_dir) or "float32", None)
    if isinstance(saved, torch.dtype) and saved != torch.float32:
        merged = merged.to(saved)  # keep the base checkpoint's size (bf16 stays bf16)
    return merged


def first_line(exc: BaseException) -> str:
    """The gist of a library error in one line of at most 300 characters (two when the first ends in ':')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:299] + "…"
