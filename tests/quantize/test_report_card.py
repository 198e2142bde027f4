"""The report's card (the JSON keys other code reads), the on-disk reference logits and llama-bench's JSON parser."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tandemlm.errors import QuantizeError
from tandemlm.quantize.reference import LogitStore
from tandemlm.quantize.report import ModelFigures, QualityReport, ReportSettings
from tandemlm.quantize.report_maths import Agreement, KLDStats
from tandemlm.quantize.speed import bench_command, parse_bench_json

# The contract with the ladder code: exactly these keys (written out here, not imported, so a rename fails).
CARD = [
    "type", "file_bytes", "bits_per_weight", "ppl", "ppl_ratio", "kld_mean", "kld_median", "kld_p99", "kld_p999",
    "kld_max", "delta_p_rms", "same_top_p", "greedy_agreement", "pp_tok_s", "tg_tok_s", "imatrix",
]


def _report(pp: float | None = 812.5, imatrix: str | None = "calib.txt, 64 chunks") -> QualityReport:
    original = ModelFigures("F16", "a.gguf", "gguf", 1000, 500, 16.0, 10.0, "F16", 400.0, 50.0)
    quantized = ModelFigures("Q4_K_M", "b.gguf", "gguf", 300, 500, 4.8, 10.5, "Q4_K_M", pp, None if pp is None else 90.0)
    kld = KLDStats(mean=0.03, median=0.01, p99=0.4, p999=1.2, max=3.5)
    return QualityReport(
        original=original, quantized=quantized, text="prose + macbeth", scored_tokens=8176, window=512,
        size_ratio=0.3, perplexity_change=0.05, ppl_ratio=1.05, kl_mean=0.03, kl_p99=0.4, kld=kld, delta_p_rms=0.042,
        same_top_rate=0.93, greedy_prompts=8, greedy_tokens=32, greedy_token_agreement=0.7, greedy_exact_rate=0.25,
        template_identical=True, prompt_tokens_identical=True, imatrix=imatrix,
    )


def test_card_has_exactly_the_agreed_keys_with_the_quantized_sides_values(tmp_path):
    card = _report().card()
    assert list(card) == CARD
    assert card == {
        "type": "Q4_K_M", "file_bytes": 300, "bits_per_weight": 4.8, "ppl": 10.5, "ppl_ratio": 1.05, "kld_mean": 0.03,
        "kld_median": 0.01, "kld_p99": 0.4, "kld_p999": 1.2, "kld_max": 3.5, "delta_p_rms": 0.042, "same_top_p": 0.93,
        "greedy_agreement": 0.7, "pp_tok_s": 812.5, "tg_tok_s": 90.0, "imatrix": "calib.txt, 64 chunks",
    }
    saved = json.loads(_report(pp=None, imatrix=None).write_json(tmp_path / "r.json").read_text())
    assert list(saved["card"]) == CARD
    assert saved["card"]["pp_tok_s"] is None and saved["card"]["tg_tok_s"] is None and saved["card"]["imatrix"] is None
    # the older fields stay where other code reads them
    assert saved["kl_mean"] == 0.03 and saved["kl_p99"] == 0.4 and saved["same_top_rate"] == 0.93
    assert saved["kld"]["p999"] == 1.2 and saved["text"] == "prose + macbeth"


def test_table_shows_the_new_rows():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_report().table())
    shown = console.export_text()
    for row in ("KLD mean / median", "KLD p99 / p99.9 / max", "RMS Δp", "same top token", "pp512 tok/s (llama-bench)",
                "tg128 tok/s (llama-bench)", "×1.0500", "812.5", "calib.txt, 64 chunks", "text: prose + macbeth"):
        assert row in shown, row


def test_the_reference_on_disk_gives_exactly_the_in_ram_numbers(tmp_path):
    rng = np.random.default_rng(1)
    vocab, spans = 300, [[5, *rng.integers(0, 300, size=n)] for n in (40, 40, 17)]
    original = [(rng.normal(size=(len(s) - 1, vocab)) * 4).astype(np.float32) for s in spans]
    quantized = [(o + rng.normal(scale=0.3, size=o.shape)).astype(np.float32) for o in original]
    in_ram, on_disk = Agreement(), Agreement()
    rows_total = sum(len(s) - 1 for s in spans)  # 40 + 40 + 17
    with LogitStore(rows=rows_total, folder=tmp_path) as store:
        for rows in original:
            store.append(rows)
        path = store.path
        assert path is not None and path.name.startswith(f"{os.getpid()}-reference.")  # swept if this process dies
        assert path.stat().st_size == rows_total * vocab * 4 == 97 * 300 * 4  # float32 rows, nothing rounded
        for i, (span, rows) in enumerate(zip(spans, quantized, strict=True)):
            assert isinstance(store.window(i), np.memmap)
            on_disk.add_window(store.window(i), rows, span)
            in_ram.add_window(original[i], rows, span)
    assert not path.exists()
    assert on_disk.kl_values == in_ram.kl_values and on_disk.delta_p == in_ram.delta_p  # bit for bit
    assert on_disk.kld() == in_ram.kld() and on_disk.same_top == in_ram.same_top and on_disk.kl_mean > 0.01


def test_the_reference_file_goes_when_scoring_fails_or_its_process_died(tmp_path):
    killed = tmp_path / "999999999-reference.abc.f32"  # left by a report killed with SIGKILL
    killed.write_bytes(b"\0" * 64)
    store = LogitStore(rows=4, folder=tmp_path)
    store.append(np.zeros((3, 10), np.float32))
    assert not killed.exists()  # swept before the new file was written
    with pytest.raises(ValueError, match="do not fit"):
        store.append(np.zeros((3, 10), np.float32))  # 6 rows into 4
    store.close()
    assert list(tmp_path.iterdir()) == []


# Shaped like llama-bench's -o json (tools/llama-bench/README.md), most fields left out.
BENCH_JSON = """[
  {"model_type": "llama ?B Q8_0", "n_threads": 1, "n_prompt": 512, "n_gen": 0, "avg_ts": 1523.25,
   "stddev_ts": 10.5, "samples_ts": [ 1523.25 ]},
  {"model_type": "llama ?B Q8_0", "n_threads": 1, "n_prompt": 0, "n_gen": 128, "avg_ts": 301.5,
   "stddev_ts": 2.0, "samples_ts": [ 301.5 ]}
]"""


def test_bench_json_gives_pp512_and_tg128():
    speed = parse_bench_json(BENCH_JSON)
    assert (speed.pp_tok_s, speed.tg_tok_s) == (1523.25, 301.5)
    only_pp = json.dumps(json.loads(BENCH_JSON)[:1])
    with pytest.raises(QuantizeError, match="llama-bench's JSON has no tg128 result"):
        parse_bench_json(only_pp)
    with pytest.raises(QuantizeError, match="llama-bench printed no JSON"):
        parse_bench_json("error: failed to load model\n")


def test_bench_command_and_settings(tmp_path):
    command = bench_command(tmp_path / "llama-bench", tmp_path / "m.gguf", threads=2, repetitions=1)
    assert command[1:] == ["-m", str(tmp_path / "m.gguf"), "-p", "512", "-n", "128", "-t", "2", "-r", "1", "-o", "json"]
    settings = ReportSettings()
    assert settings.max_text_tokens == 8192 and settings.bench and settings.repetitions == 3
    with pytest.raises(QuantizeError, match="repetitions must be at least 1, got 0"):
        ReportSettings(repetitions=0)
