"""The shared ground's file helpers: atomic writes (models/atomic.py), weight files, the LoRA merge."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tandemlm.models.weight_files import safetensors_files, weight_files, weights_bytes
from tandemlm.storage.atomic import atomic_path, atomic_write_text, staging_folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_gives_the_umask_mode_and_leaves_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "run.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "run.json").read_text() == "{}\n"
    assert _mode(tmp_path / "a" / "run.json") == 0o644  # not mkstemp's private 0600
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run.json"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_path_can_stage_in_another_folder_named_by_pid(tmp_path):
    (tmp_path / "tmp").mkdir()
    with atomic_path(tmp_path / "out.gguf", ".partial", tmp_path / "tmp") as tmp:
        assert tmp.parent == tmp_path / "tmp" and tmp.name.startswith(f"{os.getpid()}-out.gguf.")
        tmp.write_bytes(b"GGUF")
    assert (tmp_path / "out.gguf").read_bytes() == b"GGUF" and not list((tmp_path / "tmp").iterdir())


def test_staging_folder_replaces_a_target_or_keeps_a_marked_one(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale").write_text("x")
    with staging_folder(target) as staging:
        (staging / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    (target / "DONE").write_text("")  # a concurrent builder published a complete one first
    with staging_folder(target, marker="DONE") as staging:
        (staging / "mine").write_text("")
    assert not (target / "mine").exists()
    with pytest.raises(RuntimeError), staging_folder(tmp_path / "other") as staging:
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half folder, no staging left


def test_weight_files_count_safetensors_and_model_bins_only(tmp_path):
    for name, size in {"model-1.safetensors": 3, "pytorch_model.bin": 5, "training_args.bin": 7, "tokenizer.json": 11}.items():
        (tmp_path / name).write_bytes(b"x" * size)
    assert [p.name for p in weight_files(tmp_path)] == ["model-1.safetensors", "pytorch_model.bin"]
    assert [p.name for p in safetensors_files(tmp_path)] == ["model-1.safetensors"]
    assert weights_bytes(tmp_path) == 8
    assert weights_bytes(tmp_path / "missing") == 0


@pytest.mark.slow
def test_lora_merge_keeps_the_base_dtype_and_names_a_misfit(tiny_llama_dir, tmp_path):
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tandemlm.models.lora_merge import AdapterMismatch, merge_lora

    base_dir = tmp_path / "bf16"
    shutil.copytree(tiny_llama_dir, base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    expected = lora.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()

    merged = merge_lora(base_dir, tmp_path / "adapter")
    assert merged.dtype == torch.bfloat16  # merged in fp32, saved as the checkpoint's dtype
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight.float(), expected, atol=1e-2)
    narrow = AutoModelForCausalLM.from_config(LlamaConfig(**{**config, "hidden_size": 32, "intermediate_size": 64}))
    get_peft_model(narrow, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "narrow")
    with pytest.raises(AdapterMismatch, match=r"^adapter .*narrow does not fit .*size mismatch"):
        merge_lora(base_dir, tmp_path / "narrow")
