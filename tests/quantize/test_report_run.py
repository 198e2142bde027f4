"""The quality report run for real on tiny GGUFs: the card's numbers, the temp file, and llama-bench's speeds."""

from __future__ import annotations

import json
import os

import pytest

from tandemlm.errors import QuantizeError
from tandemlm.quantize import speed
from tandemlm.quantize.cache import temp_folder
from tandemlm.quantize.logit_scorers import GGUFScorer
from tandemlm.quantize.report import CARD_KEYS, ReportSettings, compare_models
from tandemlm.quantize.texts import builtin_evaluation


@pytest.fixture(scope="module")
def pair(quantized):
    """(f16, q8_0) GGUFs of the tiny Llama (SmolLM2's tokenizer, random weights)."""
    result = quantized("llama", "q8_0")
    return result.intermediate, result.path


def _our_reference_files() -> list[str]:
    return [p.name for p in temp_folder().iterdir() if p.name.startswith(f"{os.getpid()}-reference.")]


def test_report_on_tiny_ggufs_without_speed(pair):
    f16, q8 = pair
    settings = ReportSettings(window=128, max_text_tokens=600, prompts=1, greedy_tokens=4, bench=False)
    report = compare_models(f16, q8, settings)
    card = report.card()
    assert tuple(card) == CARD_KEYS
    assert card["type"] == "Q8_0" and report.original.qtype == "F16" and card["imatrix"] is None
    assert card["pp_tok_s"] is card["tg_tok_s"] is report.original.pp_tok_s is None  # speed skipped: null
    assert report.text == builtin_evaluation().name and 590 <= report.scored_tokens <= 600
    assert card["ppl"] == report.quantized.perplexity
    assert card["ppl_ratio"] == pytest.approx(report.quantized.perplexity / report.original.perplexity, rel=1e-12)
    assert 0 < card["kld_median"] <= card["kld_p99"] <= card["kld_p999"] <= card["kld_max"] < 1
    assert card["kld_mean"] == report.kl_mean and card["kld_p99"] == report.kl_p99
    assert 0 < card["delta_p_rms"] < 0.1 and card["same_top_p"] > 0.8
    assert card["bits_per_weight"] < report.original.bits_per_weight and card["file_bytes"] == q8.stat().st_size
    assert _our_reference_files() == []  # the original's logits went with the run


def test_reference_file_is_removed_when_the_quantized_side_fails(pair, tmp_path):
    f16, _ = pair
    settings = ReportSettings(window=64, max_text_tokens=100, prompts=0, bench=False)
    with pytest.raises(QuantizeError, match="does not exist"):
        compare_models(f16, tmp_path / "missing.gguf", settings)  # fails after the reference was written
    assert _our_reference_files() == []


def test_builtin_evaluation_text_covers_the_default_8192_tokens(pair):
    scorer = GGUFScorer(pair[1], n_ctx=64)
    try:
        assert len(scorer.tokenize(builtin_evaluation().content)) > ReportSettings().max_text_tokens == 8192
    finally:
        scorer.close()


def test_speed_rows_are_llama_benchs_own_averages(pair, monkeypatch):
    outputs: list[list[dict]] = []
    parse = speed.parse_bench_json
    monkeypatch.setattr(speed, "parse_bench_json", lambda text: outputs.append(json.loads(text)) or parse(text))
    settings = ReportSettings(window=64, max_text_tokens=100, prompts=0, bench=True, repetitions=1)
    report = compare_models(*pair, settings)
    assert len(outputs) == 2  # one llama-bench run per GGUF side
    for figures, tests in zip((report.original, report.quantized), outputs, strict=True):
        by_test = {(test["n_prompt"], test["n_gen"]): test for test in tests}
        assert set(by_test) == {(512, 0), (0, 128)}
        assert all(len(test["samples_ts"]) == 1 and test["model_filename"] == figures.path for test in tests)  # -r 1
        assert isinstance(figures.pp_tok_s, float) and figures.pp_tok_s == by_test[512, 0]["avg_ts"] > 0
        assert isinstance(figures.tg_tok_s, float) and figures.tg_tok_s == by_test[0, 128]["avg_ts"] > 0
    card = report.card()
    assert (card["pp_tok_s"], card["tg_tok_s"]) == (report.quantized.pp_tok_s, report.quantized.tg_tok_s)
