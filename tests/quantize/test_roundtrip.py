"""HF → GGUF → q8_0 / q4_k_m for the tiny Llama, Qwen2 and DeepSeek-V3: load, chat, same template and tokens."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tandemlm.deploy.engine import collect
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.models.resolve import ModelSource
from tandemlm.quantize.logit_scorers import GGUFScorer
from tandemlm.quantize.quant_types import get_quant_type
from tandemlm.quantize.verify import end_of_turn_id
from tandemlm.testing.tiny_models import tiny_model

ARCHS = ("llama", "qwen2", "deepseek_v3")
TYPES = ("q8_0", "q4_k_m")
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours, please."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more? Ünïcödé ✓"},
]


def _engine(path):
    # A ModelSource skips resolve_model's GGUFReader pass (10 s and more on 150k-token vocabularies);
    # the verify stage has already read this header.
    return load_engine(ModelSource(model_id=path.stem, kind="gguf", path=path), backend="llama.cpp", n_ctx=256, n_parallel=1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_loads_chats_and_keeps_the_template(quantized, arch, qtype):
    result = quantized(arch, qtype)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(arch))
    info = read_gguf_info(result.path)
    assert info.file_type == get_quant_type(qtype).ftype
    assert info.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert info.token_id("bos") == tokenizer.bos_token_id and info.token_id("eos") == tokenizer.eos_token_id
    engine = _engine(result.path)
    try:
        prompt = engine.render_chat(MESSAGES)
        assert prompt == tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert engine.tokenize(prompt) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = collect(engine.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8)))
        assert reply.usage.completion_tokens >= 1 and reply.finish_reason in ("stop", "length")
    finally:
        engine.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_stops_at_the_templates_end_of_turn_token(quantized, arch):
    result = quantized(arch, "q4_k_m")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(arch))
    eot = end_of_turn_id(tokenizer)
    assert eot is not None and eot == result.verification.end_of_turn_id
    assert eot == tokenizer.eos_token_id  # transformers stops there too (the HF engine's stop set)
    scorer = GGUFScorer(result.path, n_ctx=64)
    try:
        assert scorer.is_end_of_generation(eot)
    finally:
        scorer.close()


def test_sizes_shrink_with_the_type(quantized):
    for arch in ARCHS:
        q8, q4 = quantized(arch, "q8_0"), quantized(arch, "q4_k_m")
        f16 = q8.intermediate
        assert q4.path.stat().st_size < q8.path.stat().st_size < f16.stat().st_size, arch


def test_k_quant_fallbacks_are_named(quantized):
    # DeepSeek-V3's MLA splits kv_b into attn_k_b with 64-wide rows: no q4_K there, llama.cpp uses q5_0.
    fallbacks = quantized("deepseek_v3", "q4_k_m").fallbacks
    assert {f.tensor for f in fallbacks} == {"blk.0.attn_k_b.weight", "blk.1.attn_k_b.weight"}
    assert {(f.row_length, f.stored_as) for f in fallbacks} == {(64, "q5_0")}
    line = quantized("deepseek_v3", "q4_k_m").fallback_line()
    assert "\n" not in line and "2 of 34 tensors" in line and "q5_0" in line
    assert quantized("llama", "q4_k_m").fallbacks == []  # hidden 256, intermediate 512: all rows fit
