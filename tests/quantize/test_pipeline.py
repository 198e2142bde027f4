"""The pipeline's promises: atomic output, content cache, one-line errors for bad input and full disks."""

from __future__ import annotations

import errno
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandemlm.errors import EngineError, QuantizeError
from tandemlm.models.builtin import builtin_gguf
from tandemlm.quantize import pipeline, space
from tandemlm.quantize.llamacpp_tools import ConversionError
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model
from tandemlm.quantize.quant_types import get_quant_type
from tandemlm.quantize.quantizer import Fallback
from tandemlm.quantize.verify import verify_gguf
from tandemlm.testing.tiny_models import tiny_model


def _config(quant_cache: Path, out: Path, qtype: str, **extra: object) -> QuantizeConfig:
    return QuantizeConfig(model=str(tiny_model("llama")), qtype=qtype, out=out, cache_root=quant_cache, **extra)


def _count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> Counter[str]:
    calls: Counter[str] = Counter()
    for name in names:
        real = getattr(pipeline, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, counted)
    return calls


def test_same_input_and_type_reuses_the_verified_result(quantized, quant_cache, tmp_path, monkeypatch):
    first = quantized("llama", "q8_0")
    calls = _count_calls(monkeypatch, "convert_hf_to_gguf", "quantize_gguf", "verify_gguf")
    again = quantize_model(_config(quant_cache, tmp_path / "again.gguf", "Q8_0"))
    assert calls == Counter()  # no stage ran
    assert again.cached and again.path == tmp_path / "again.gguf"
    assert again.path.read_bytes() == first.path.read_bytes()
    assert again.verification == first.verification


def test_another_type_reuses_the_f16_intermediate(quantized, quant_cache, tmp_path, monkeypatch):
    quantized("llama", "q8_0")
    calls = _count_calls(monkeypatch, "convert_hf_to_gguf", "quantize_gguf")
    result = quantize_model(_config(quant_cache, tmp_path / "q4_0.gguf", "q4_0"))
    assert calls == Counter({"quantize_gguf": 1})
    assert not result.cached and result.path.is_file()


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("stage", ["quantize_gguf", "verify_gguf"])
def test_a_failed_or_interrupted_stage_leaves_nothing(quantized, quant_cache, tmp_path, monkeypatch, leftovers, stage, failure):
    quantized("llama", "q8_0")  # the f16 intermediate is cached: the run goes straight to stage 2

    def fail(*args, **kwargs):
        if stage == "quantize_gguf":
            Path(args[1]).write_bytes(b"GGUF half-written")  # a partial output, as a real crash leaves
        raise failure

    monkeypatch.setattr(pipeline, stage, fail)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(type(failure)):
        quantize_model(_config(quant_cache, out, "q5_k_m"))
    assert not out.exists()
    assert leftovers(tmp_path, quant_cache) == []
    assert not list(quant_cache.glob("*/Q5_K_M.*"))  # nothing cached as if verified


def test_an_interrupted_conversion_leaves_nothing(quant_cache, tmp_path, monkeypatch, leftovers):
    def interrupted(hf_dir, out_path, outtype, **_):
        Path(out_path).write_bytes(b"GGUF")  # the converter's own temp handling is tested in test_convert.py
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "convert_hf_to_gguf", interrupted)
    out = tmp_path / "model.gguf"
    with pytest.raises(KeyboardInterrupt):
        quantize_model(_config(quant_cache, out, "q8_0", use_cache=False))
    assert list(tmp_path.iterdir()) == []  # not the output, not the temp folder beside it
    assert leftovers(quant_cache) == []


def test_disk_full_is_detected_before_writing(quant_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(space.shutil, "disk_usage", lambda _: SimpleNamespace(total=10**9, used=10**9 - 5000, free=5000))
    out = tmp_path / "model.gguf"
    with pytest.raises(QuantizeError, match=r"^not enough disk space in .* for the Q6_K GGUF of tiny-llama-\w+: about [\d.]+ MB needed, 0\.0 MB free$"):
        quantize_model(_config(quant_cache, out, "q6_k"))
    assert not out.exists()


@pytest.mark.parametrize(
    ("stage", "error"),
    [
        ("quantize_gguf", OSError(errno.ENOSPC, "No space left on device")),
        ("convert_hf_to_gguf", ConversionError("converting x to GGUF failed (exit 1): OSError: [Errno 28] No space left on device")),
    ],
)
def test_disk_full_mid_run_is_one_line(quantized, quant_cache, tmp_path, monkeypatch, leftovers, stage, error):
    quantized("llama", "q8_0")  # cached f16 intermediate: the quantize case goes straight to stage 2

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, stage, full)
    out = tmp_path / "model.gguf"
    with pytest.raises(QuantizeError, match=r"^disk full during the (quantize|convert) stage while writing under ") as caught:
        quantize_model(_config(quant_cache, out, "q3_k_m", use_cache=stage == "quantize_gguf"))
    assert "\n" not in str(caught.value)
    assert not out.exists() and leftovers(tmp_path, quant_cache) == []


def test_strict_refuses_k_quant_fallbacks(quantized, quant_cache, tmp_path, monkeypatch, leftovers):
    quantized("llama", "q8_0")
    real = pipeline.quantize_gguf

    def with_fallback(*args, **kwargs):
        real(*args, **kwargs)
        return [Fallback("blk.0.attn_q.weight", 576, "q5_0")]

    monkeypatch.setattr(pipeline, "quantize_gguf", with_fallback)
    out = tmp_path / "model.gguf"
    with pytest.raises(QuantizeError, match=r"Q4_K_S: 1 of 20 tensors have rows not a multiple of 256 .*q5_0.*blk\.0\.attn_q\.weight.*--strict"):
        quantize_model(_config(quant_cache, out, "q4_k_s", strict=True))
    assert not out.exists() and leftovers(tmp_path, quant_cache) == []


def test_a_float_gguf_is_quantized_without_conversion(quantized, quant_cache, tmp_path, monkeypatch):
    f16 = quantized("llama", "q8_0").intermediate
    calls = _count_calls(monkeypatch, "convert_hf_to_gguf")
    result = quantize_model(QuantizeConfig(model=str(f16), qtype="q8_0", out=tmp_path / "from-gguf.gguf", cache_root=quant_cache))
    assert calls == Counter()
    assert result.verification.template_identical and result.verification.special_ids["eos"] == 2
    record = json.loads(next(quant_cache.glob(f"{result.key}/Q8_0.json")).read_text())
    assert record["type"] == "q8_0"


def test_unsupported_architecture_is_one_line(tiny_llama_dir, quant_cache, tmp_path, leftovers):
    folder = tmp_path / "bogus"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BogusForCausalLM"]}))
    out = tmp_path / "out" / "bogus.gguf"
    with pytest.raises(EngineError, match=r"architecture BogusForCausalLM is not supported by llama\.cpp.s converter") as caught:
        quantize_model(QuantizeConfig(model=str(folder), qtype="q4_k_m", out=out, cache_root=quant_cache))
    assert "\n" not in str(caught.value)
    assert not out.exists() and leftovers(tmp_path / "out", quant_cache) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"qtype": "q9_x"}, r"unknown quant type 'q9_x'; known: f32, f16, bf16, q8_0, q6_k, q5_k_m, .*q4_k_m, .*q4_0"),
        ({"out": Path("model.bin")}, r"--out model\.bin must be a file name ending in \.gguf"),
        ({"adapter": Path("/no/such/adapter")}, r"--adapter /no/such/adapter is not a folder"),
        ({"threads": 0}, r"--threads must be at least 1, got 0"),
        ({"qtype": "bnb-4bit"}, r"type bnb-4bit is a load-time bitsandbytes quantization .* --quantize bnb-4bit"),
        ({"use_cache": False, "publish": False}, r"publish=False .* needs use_cache=True"),
    ],
)
def test_bad_settings_fail_in_one_line_before_any_work(tiny_llama_dir, changes, message):
    settings = {"model": str(tiny_llama_dir), "qtype": "q8_0", **changes}
    with pytest.raises(QuantizeError, match=message) as caught:
        QuantizeConfig(**settings)
    assert "\n" not in str(caught.value)


def test_bad_models_fail_in_one_line(tmp_path, quant_cache):
    with pytest.raises(EngineError, match=r"model path \./no/such/model does not exist"):
        quantize_model(QuantizeConfig(model="./no/such/model", out=tmp_path / "x.gguf", cache_root=quant_cache))
    already = builtin_gguf("smollm2")
    with pytest.raises(QuantizeError, match=r"is already quantized \(Q4_1\); quantize from its HF checkpoint or an f32/f16/bf16 GGUF"):
        quantize_model(QuantizeConfig(model=str(already), out=tmp_path / "x.gguf", cache_root=quant_cache))
    with pytest.raises(QuantizeError, match=r"--adapter needs an HF model folder; .* is a file"):
        quantize_model(QuantizeConfig(model=str(already), adapter=tmp_path, out=tmp_path / "x.gguf", cache_root=quant_cache))
    assert not (tmp_path / "x.gguf").exists()


def test_without_the_cache_nothing_is_kept_but_the_result(quantized, tmp_path, leftovers):
    f16 = quantized("llama", "q8_0").intermediate
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    result = quantize_model(QuantizeConfig(model=str(f16), qtype="q4_k_m", out=out_dir / "m.gguf", cache_root=cache, use_cache=False))
    assert result.path == out_dir / "m.gguf" and not result.cached
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
    assert [p for p in cache.rglob("*") if not p.is_dir()] == [] and leftovers(out_dir) == []  # at most an empty tmp/


def test_verify_rejects_a_gguf_that_does_not_match(quantized, tiny_qwen2_dir):
    q8 = quantized("llama", "q8_0").path
    with pytest.raises(QuantizeError, match=r"general\.file_type is 7, expected 15 \(Q4_K_M\)$"):
        verify_gguf(q8, get_quant_type("q4_k_m"))
    with pytest.raises(QuantizeError, match=r"tokenizer\.chat_template differs from .*tiny-qwen2.*'s chat template$"):
        verify_gguf(q8, get_quant_type("q8_0"), hf_folder=tiny_qwen2_dir)
