"""``tandem merge RUN``: fold a run's LoRA adapter into its base weights.

The result, ``RUN/merged/``, is a plain HF safetensors folder with the tokenizer: the deploy
engines load it, and ``tandem quantize`` converts it to GGUF. Written to a temp folder and renamed.
"""

from __future__ import annotations

from pathlib import Path

from tandemlm.align.errors import ConfigError
from tandemlm.align.model import load_tokenizer, quiet_transformers
from tandemlm.align.prepare import quiet_libraries
from tandemlm.align.run_folder import read_run_folder
from tandemlm.hardware import SIXTEEN_BIT, checkpoint_dtype, inference_precision
from tandemlm.models.lora_merge import merge_lora
from tandemlm.models.weight_files import weights_bytes
from tandemlm.storage.atomic import staging_folder


def merge_run(run_dir: str | Path, out: str | Path | None = None, device: str = "cpu") -> Path:
    """Merges ``run_dir``'s final adapter into its base model; returns the merged folder.

    ``device`` is "cpu", "cuda" or "auto" (the GPU when the fp32 base fits in its free memory).
    A full fine-tune has nothing to merge: its ``final/`` is returned as is.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_libraries()
    run = read_run_folder(run_dir)
    if not run.final.is_dir():
        raise ConfigError(f"run {run.dir} has no final/ model yet; finish it (or --resume it) first")
    if not run.is_adapter:
        return run.final
    device = _merge_device(device, run.base_model)
    target = Path(out).expanduser().resolve() if out else run.merged
    auto = AutoModelForSequenceClassification if run.method == "reward" else AutoModelForCausalLM
    kwargs = {"num_labels": 1} if run.method == "reward" else {}
    with quiet_transformers():  # a reward base lacks the score head the adapter brings: no "MISSING" report
        merged = merge_lora(run.base_model, run.final, auto, device, **kwargs)
    with staging_folder(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(run.final).save_pretrained(staging)
    return target


def _merge_device(device: str, base: str | Path) -> str:
    """The device for an fp32 merge: ``hardware.inference_precision``'s, unless "auto" finds the GPU too small."""
    import torch

    chosen = inference_precision(device).device
    if device != "auto" or chosen == "cpu":
        return chosen
    weights = weights_bytes(base) if Path(base).is_dir() else 0
    stored = checkpoint_dtype(base) if Path(base).is_dir() else None
    fp32_bytes = weights * (2 if stored in SIXTEEN_BIT else 1)
    free, _ = torch.cuda.mem_get_info()
    # Base + adapter + the merged copy's transient tensors: keep a margin, else merge on the CPU.
    return chosen if 0 < fp32_bytes < 0.8 * free else "cpu"
