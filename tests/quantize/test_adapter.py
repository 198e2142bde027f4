"""--adapter: a LoRA made with peft on the tiny Llama is merged before conversion; misfits fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model

TARGETS = ["q_proj", "v_proj"]


def _lora(model, folder: Path) -> Path:
    # init_lora_weights=False: random A and B, so the adapter really changes the weights it targets.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return _lora(base, tmp_path_factory.mktemp("lora") / "style")


def _tensor_bytes(path: Path, name: str) -> bytes:
    info = read_gguf_info(path)
    tensor = next(t for t in info.tensors if t.name == name)
    with path.open("rb") as handle:
        handle.seek(info.data_offset + tensor.offset)
        return handle.read(tensor.n_bytes)


def test_adapter_is_merged_before_quantizing(quantized, adapter, tiny_llama_dir, quant_cache, tmp_path):
    base = quantized("llama", "q8_0").path
    merged = quantize_model(
        QuantizeConfig(model=str(tiny_llama_dir), adapter=adapter, qtype="q8_0", out=tmp_path / "merged.gguf", cache_root=quant_cache)
    )
    for layer in (0, 1):
        for name in ("attn_q", "attn_v"):  # targeted by the LoRA: changed
            tensor = f"blk.{layer}.{name}.weight"
            assert _tensor_bytes(merged.path, tensor) != _tensor_bytes(base, tensor), tensor
        for name in ("attn_k", "ffn_down"):  # untouched: bit-identical after the same quantizer
            tensor = f"blk.{layer}.{name}.weight"
            assert _tensor_bytes(merged.path, tensor) == _tensor_bytes(base, tensor), tensor
    assert merged.verification.template_identical and merged.verification.prompt_tokens_identical


def test_adapter_for_another_shape_fails_in_one_line(tiny_llama_dir, quant_cache, tmp_path, leftovers):
    small = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )
    wrong = _lora(small, tmp_path / "wrong")
    out = tmp_path / "out.gguf"
    config = QuantizeConfig(model=str(tiny_llama_dir), adapter=wrong, qtype="q8_0", out=out, cache_root=quant_cache)
    with pytest.raises(QuantizeError, match=r"^--adapter .*wrong does not fit .*: .*size mismatch .*q_proj\.lora_A") as caught:
        quantize_model(config)
    assert "\n" not in str(caught.value)
    assert not out.exists() and leftovers(tmp_path, quant_cache) == []


def test_adapter_recorded_for_another_base_fails_in_one_line(adapter, tiny_llama_dir, tiny_qwen2_dir, quant_cache, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in adapter.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_qwen2_dir)}))
    with pytest.raises(QuantizeError, match=r"was trained on .*tiny-qwen2.*, which does not match .*\(model_type qwen2 vs llama; .*vocab_size 151936 vs 49152\)"):
        quantize_model(QuantizeConfig(model=str(tiny_llama_dir), adapter=moved, out=tmp_path / "x.gguf", cache_root=quant_cache))


def test_a_folder_without_adapter_config_is_refused(tiny_llama_dir, quant_cache, tmp_path):
    with pytest.raises(QuantizeError, match=r"--adapter .* is not a PEFT adapter folder: adapter_config\.json is missing"):
        quantize_model(QuantizeConfig(model=str(tiny_llama_dir), adapter=tmp_path, out=tmp_path / "x.gguf", cache_root=quant_cache))
