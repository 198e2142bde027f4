"""Tiny real-architecture models: they build, load in transformers, and carry real tokenizers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandemlm.errors import EngineError
from tandemlm.testing import tiny_models as fixtures
from tandemlm.testing.tiny_models import SPECS, TinySpec, TokenizerRecipe, tiny_model

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
MIXED_TEXT = "Hello world,  two spaces\n\tand 12345 numbers! Привет 你好 émigré ✓"


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_dir(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def tokenizer(arch_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(arch_dir[1])


def test_folder_is_a_small_real_checkpoint(arch_dir):
    arch, folder = arch_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHS[arch]]
    assert (config["hidden_size"], config["num_hidden_layers"], config["dtype"]) == (256, 2, "float32")
    assert (folder / "model.safetensors").stat().st_size < 150_000_000
    assert (folder / "chat_template.jinja").is_file()


def test_loads_in_transformers_and_runs(arch_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arch_dir[1]).eval()
    assert model.dtype == torch.float32  # config.json says float32 although the weights are bf16
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert len(tokenizer) <= model.config.vocab_size


def test_tokenizer_round_trips_text(tokenizer):
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == MIXED_TEXT
    assert len(ids) < len(MIXED_TEXT)  # real merges, not characters


def test_chat_template_renders_with_special_tokens(arch_dir, tokenizer):
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "And 3+3?" in text and "Answer briefly." in text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.eos_token_id in ids  # every one of these templates ends a turn with EOS
    assert tokenizer.decode(ids) == text


def test_r1_distill_qwen_prompt_opens_a_think_block(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    # R1-Distill-Qwen's ids: EOS 151643, BOS 151646, <think> 151648; no token added on reload.
    assert (tokenizer.eos_token_id, tokenizer.bos_token_id) == (151643, 151646)
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151648, 151649]
    assert len(tokenizer) == 151650


def test_deepseek_tokenizer_keeps_spaces(tiny_deepseek_v3_dir):
    from transformers import AutoTokenizer

    # Guards transformers#45488 (LlamaTokenizer drops DeepSeek's byte-level spaces).
    tokenizer = AutoTokenizer.from_pretrained(tiny_deepseek_v3_dir)
    assert tokenizer.decode(tokenizer.encode("hello world", add_special_tokens=False)) == "hello world"


def test_cache_hit_builds_nothing_and_needs_no_torch(tiny_llama_dir, monkeypatch):
    code = (
        "import sys\n"
        "from tandemlm.testing.tiny_models import tiny_model\n"
        "print(tiny_model('llama')); print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(tiny_llama_dir), "False", "False"]

    def no_build(*_):
        raise AssertionError("a cache hit rebuilt the fixture")

    monkeypatch.setattr(fixtures, "_build", no_build)
    assert tiny_model("llama") == tiny_llama_dir


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(EngineError, match="no tiny model for architecture 'gpt2'; known: llama, qwen2, deepseek_v3"):
        tiny_model("gpt2")


def test_failed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def broken_tokenizer():
        raise RuntimeError("tokenizer files missing")

    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    monkeypatch.setitem(fixtures.TOKENIZERS, "broken", TokenizerRecipe(broken_tokenizer, lambda: "broken==0"))
    monkeypatch.setitem(SPECS, "broken", TinySpec(arch="broken", config_class="LlamaConfig", tokenizer="broken"))
    with pytest.raises(RuntimeError, match="tokenizer files missing"):
        tiny_model("broken")
    assert list((tmp_path / "fixtures").iterdir()) == []
