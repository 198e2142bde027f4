"""``tandem merge RUN``: fold a run's LoRA adapter into its base weights.

The result, ``RUN/merged/``, is a plain HF safetensors folder with the tokenizer: the deploy
engines load it, and ``tandem quantize`` converts it to GGUF. Written to a temp folder and renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tandemlm.align.errors import ConfigError
from tandemlm.align.model import load_tokenizer, quiet_transformers
from tandemlm.align.prepare import quiet_libraries
from tandemlm.align.run_folder import read_run_folder
from tandemlm.models.atomic import replace_dir


def merge_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Merges ``run_dir``'s final adapter into its base model; returns the merged folder.

    A full fine-tune has nothing to merge: its ``final/`` is returned as is.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_libraries()
    run = read_run_folder(run_dir)
    if not run.final.is_dir():
        raise ConfigError(f"run {run.dir} has no final/ model yet; finish it (or --resume it) first")
    if not run.is_adapter:
        return run.final
    target = Path(out).expanduser().resolve() if out else run.merged
    auto = AutoModelForSequenceClassification if run.method == "reward" else AutoModelForCausalLM
    kwargs = {"num_labels": 1} if run.method == "reward" else {}
    # fp32 for the merge: adding a low-rank product to bf16 weights rounds it away on small models.
    with quiet_transformers():  # a reward base lacks the score head the adapter brings: no "MISSING" report
        base = auto.from_pretrained(run.base_model, dtype=torch.float32, **kwargs)
    merged = PeftModel.from_pretrained(base, run.final).merge_and_unload()
    saved_dtype = getattr(AutoConfig.from_pretrained(run.base_model), "dtype", None)
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        merged = merged.to(saved_dtype)  # keep the base checkpoint's size (bf16 stays bf16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        load_tokenizer(run.final).save_pretrained(staging)
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
