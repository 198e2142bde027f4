"""The built-in SmolLM2: its HF copy → f16/q8_0/q4_k_m GGUFs format, stop and score like the original.

The HF copy is materialised from the packaged Q4_1 GGUF, so these deltas measure re-quantizing.
"""

from __future__ import annotations

import json

import pytest

from tandemlm.deploy.engine import collect
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.models.resolve import ModelSource, resolve_model
from tandemlm.quantize.report import ReportSettings, compare_models

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def f16(quantized):
    """The f16 GGUF that llama.cpp's converter made from the HF copy (the pipeline's stage-1 output)."""
    return quantized("smollm2", "q8_0").intermediate


def test_gguf_formats_and_stops_exactly_as_the_hf_model(quantized, f16):
    hf = load_engine(str(resolve_model("smollm2").hf_folder()), backend="transformers")
    cpp = load_engine(ModelSource("smollm2-f16", "gguf", f16), backend="llama.cpp", n_ctx=512, n_parallel=1)
    try:
        prompt = hf.render_chat(QUESTION)
        assert cpp.render_chat(QUESTION) == prompt
        assert cpp.tokenize(prompt) == hf.tokenize(prompt)
        params = SamplingParams(temperature=0, max_tokens=40)
        hf_reply, cpp_reply = collect(hf.chat(QUESTION, params)), collect(cpp.chat(QUESTION, params))
    finally:
        hf.close()
        cpp.close()
    # Both end the turn on their own (at <|im_end|>, the template's end-of-turn token), long before max_tokens.
    assert hf_reply.finish_reason == cpp_reply.finish_reason == "stop"
    assert hf_reply.usage.completion_tokens < 40
    assert "Paris" in hf_reply.text
    assert cpp_reply.text == hf_reply.text
    verification = quantized("smollm2", "q8_0").verification
    assert verification.end_of_turn_id == 2 and verification.template_identical and verification.prompt_tokens_identical


def test_report_numbers_are_sane(quantized, f16, tmp_path):
    q8, q4 = quantized("smollm2", "q8_0"), quantized("smollm2", "q4_k_m")
    assert q4.path.stat().st_size < q8.path.stat().st_size < f16.stat().st_size
    report = compare_models(f16, q8.path, ReportSettings(max_text_tokens=2048, prompts=1, greedy_tokens=8, bench=False))
    assert report.scored_tokens > 1000
    assert abs(report.perplexity_change) < 0.01  # q8_0 within 1% of f16
    assert 5 < report.original.perplexity < 100  # a real model on plain English, not a broken one
    assert report.same_top_rate > 0.9 and 0 < report.kl_mean < 0.05
    assert 8.4 < report.quantized.bits_per_weight < 9 and 15.9 < report.original.bits_per_weight < 16.5
    assert report.template_identical and report.prompt_tokens_identical
    saved = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert saved["perplexity_change"] == report.perplexity_change and saved["quantized"]["kind"] == "gguf"
