"""Small pieces: the type table, the fast GGUF header reader, the report's arithmetic."""

from __future__ import annotations

import math

import gguf
import llama_cpp
import numpy as np
import pytest

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.quant_types import QUANT_TYPES, get_quant_type, quant_type_for_ftype
from tandemlm.quantize.quantizer import Fallback, describe_fallbacks
from tandemlm.quantize.report_maths import Agreement, greedy_agreement, windows

REQUIRED = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def test_type_table_matches_llama_cpp():
    assert set(REQUIRED) <= set(QUANT_TYPES)
    assert get_quant_type("Q4_K_M").ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert get_quant_type("q8_0").ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert get_quant_type("F32").ftype == llama_cpp.LLAMA_FTYPE_ALL_F32
    assert [get_quant_type(n).bits for n in ("f16", "q8_0", "q6_k", "q4_k_m")] == [16.0, 8.5, 6.5625, 4.5]
    assert get_quant_type("q4-k-m") is get_quant_type("Q4_K") is QUANT_TYPES["q4_k_m"]
    assert get_quant_type("BNB-4bit").load_in_bits == 4
    assert quant_type_for_ftype(llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K) is QUANT_TYPES["q6_k"]
    assert get_quant_type("q4_k_m").is_k_quant and not get_quant_type("q4_0").is_k_quant


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(QuantizeError, match=r"^unknown quant type 'q7'; known: f32, f16, bf16, q8_0, .*bnb-8bit$"):
        get_quant_type("q7")


def test_header_reader_agrees_with_gguf_py(tmp_path):
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])  # long: stepped over
    writer.add_array("small.list", [1, 2, 3])
    writer.add_tensor("token_embd.weight", np.ones((8, 256), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = read_gguf_info(path), gguf.GGUFReader(path)
    assert ours.metadata["llama.block_count"] == 2 and ours.metadata["small.list"] == [1, 2, 3]
    assert ours.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert ours.array_lengths["tokenizer.ggml.tokens"] == 300 and "tokenizer.ggml.tokens" not in ours.metadata
    assert [(t.name, t.shape, t.type_name, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes)) for t in theirs.tensors
    ]
    assert [ours.data_offset + t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]
    assert ours.n_params == 8 * 256 + 256 * 64


def test_header_reader_rejects_damaged_files(tmp_path):
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(QuantizeError, match=r"not\.gguf is not a GGUF file \(bad magic bytes\)"):
        read_gguf_info(tmp_path / "not.gguf")
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(QuantizeError, match=r"cut\.gguf is a damaged or truncated GGUF file"):
        read_gguf_info(tmp_path / "cut.gguf")


def test_windows_start_with_bos_and_cover_every_token():
    ids = list(range(10, 20))
    spans = windows(ids, 4, bos=1)
    assert spans == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert windows(ids, 5, bos=None) == [ids[:5], ids[5:]]


def test_identical_models_agree_perfectly_and_a_shifted_one_does_not():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32)
    window = [0, 3, 7, 1, 4, 9]
    same = Agreement()
    same.add_window(logits, logits.copy(), window)
    assert same.kl_mean == pytest.approx(0, abs=1e-12) and same.same_top_rate == 1
    assert same.perplexity_original == same.perplexity_quantized > 1
    other = Agreement()
    other.add_window(logits, np.roll(logits, 1, axis=1), window)
    assert other.kl_mean > 0.1 and other.same_top_rate < 1 and math.isfinite(other.kl_p99)


def test_agreement_is_kl_original_to_quantized_per_position_on_hand_worked_numbers():
    # Two scored positions over a 2-token vocabulary, logits shifted by constants (log-softmax removes them).
    p1, q1 = [0.4, 0.6], [0.9, 0.1]  # the models disagree here
    p2 = q2 = [0.25, 0.75]  # and agree here
    original = np.log([p1, p2]) + np.array([[3.0], [-1.0]])
    quantized = np.log([q1, q2]) + np.array([[0.5], [2.0]])
    agreement = Agreement()
    agreement.add_window(original.astype(np.float32), quantized.astype(np.float32), [1, 0, 1])  # targets 0, then 1
    kl_1 = 0.4 * math.log(0.4 / 0.9) + 0.6 * math.log(0.6 / 0.1)  # KL(P_original || P_quantized) = 0.7507
    assert kl_1 == pytest.approx(0.750684, abs=1e-6)  # the hand computation; KL(Q || P) would be 0.5507
    assert agreement.kl_mean == pytest.approx(kl_1 / 2, abs=1e-6)  # averaged over 2 positions, not summed
    assert agreement.kl_values == pytest.approx([kl_1, 0.0], abs=1e-6)
    assert agreement.same_top_rate == 0.5  # position 1: original picks token 1, quantized token 0
    assert agreement.perplexity_original == pytest.approx((0.4 * 0.75) ** -0.5, rel=1e-6)  # exp(mean NLL of targets)
    assert agreement.perplexity_quantized == pytest.approx((0.9 * 0.75) ** -0.5, rel=1e-6)


def test_greedy_agreement_counts_the_shared_prefix():
    assert greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]]) == (pytest.approx((0.5 + 1) / 2), 0.5)
    assert greedy_agreement([], []) == (1.0, 1.0)


def test_fallbacks_are_described_in_one_line():
    fallbacks = [Fallback(f"blk.{i}.attn_q.weight", 576, "q5_0") for i in range(4)] + [Fallback("blk.0.attn_v.weight", 576, "q8_0")]
    line = describe_fallbacks(fallbacks, get_quant_type("q4_k_m"), 30)
    assert line == (
        "Q4_K_M: 5 of 30 tensors have rows not a multiple of 256 and were stored with llama.cpp's fallback types "
        "(4 as q5_0, 1 as q8_0): blk.0.attn_q.weight, blk.1.attn_q.weight, blk.2.attn_q.weight, …"
    )
    assert describe_fallbacks([], get_quant_type("q4_k_m")) == ""
