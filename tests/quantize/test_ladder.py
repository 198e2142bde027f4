"""The quant ladder: types parsed, the budget's pick on hand-made cards, and a real 2-type ladder on
the built-in model sharing one conversion and one importance matrix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandemlm.errors import QuantizeError
from tandemlm.quantize.ladder import budget_line, parse_types, smallest_within
from tandemlm.quantize.pipeline import QuantizeConfig
from tandemlm.quantize.report import ReportSettings


def _card(name: str, mib: float, kld: float) -> dict:
    return {"type": name, "file_bytes": int(mib * 2**20), "kld_mean": kld}


CARDS = [_card("Q8_0", 138, 0.002), _card("Q6_K", 110, 0.011), _card("Q4_K_M", 100, 0.051), _card("IQ4_XS", 87, 0.139),
         _card("Q2_K", 70, float("nan"))]


def test_types_are_canonical_known_and_given_once() -> None:
    assert parse_types("Q8_0, q4_k, IQ4-XS") == ["q8_0", "q4_k_m", "iq4_xs"]
    with pytest.raises(QuantizeError, match=r"unknown quant type 'q9'; known: f32"):
        parse_types("q8_0,q9")
    with pytest.raises(QuantizeError, match=r"q4_k_m given twice"):
        parse_types("q4_k_m,q4_k")
    with pytest.raises(QuantizeError, match=r"bnb-4bit is not made by llama\.cpp's quantizer"):
        parse_types("q8_0,bnb-4bit")


@pytest.mark.parametrize(("budget", "expected"), [(0.06, "Q4_K_M"), (0.011, "Q6_K"), (0.5, "IQ4_XS"), (0.001, None)])
def test_the_budget_picks_the_smallest_type_within_it(budget: float, expected: str | None) -> None:
    chosen = smallest_within(CARDS, budget)
    assert (chosen["type"] if chosen else None) == expected  # the NaN row (an unmeasured type) is never chosen


def test_the_budget_line_names_the_pick_or_the_closest_miss() -> None:
    assert budget_line(CARDS, 0.06).startswith("--max-kld 0.06: Q4_K_M is the smallest type within it (0.0510 mean KLD, 100.0 MiB)")
    assert budget_line(CARDS, 0.001) == "--max-kld 0.001: no type is within it; the closest is Q8_0 at 0.0020 mean KLD"


def test_a_two_type_ladder_on_the_builtin_model_writes_table_json_and_plot(quant_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandemlm.cli.quantize_ladder import ladder

    settings = ReportSettings(max_text_tokens=600, window=300, prompts=1, greedy_tokens=8, bench=False)
    base = QuantizeConfig(model="smollm2", qtype="q4_k_m", cache_root=quant_cache, report=settings, calibration_chunks=2)
    results, chosen = ladder(base, "q4_k_m,q8_0", tmp_path / "ladder", max_kld=10.0)
    assert chosen is results[0]  # what --serve would serve
    payload = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    assert [card["type"] for card in payload["cards"]] == ["Q4_K_M", "Q8_0"]
    q4, q8 = payload["cards"]
    assert q4["file_bytes"] < q8["file_bytes"] and q8["kld_mean"] < q4["kld_mean"]  # fewer bits, more divergence
    assert payload["chosen"] == "Q4_K_M"  # the smaller one, within a loose budget
    assert q4["imatrix"] and "2 × 512 tokens" in q4["imatrix"] and q8["imatrix"] is None  # q8_0 takes no matrix
    assert (tmp_path / "ladder" / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "Q4_K_M" in out and "Q8_0" in out and "--max-kld 10: Q4_K_M is the smallest type within it" in out
    assert results[0].intermediate == results[1].intermediate  # one conversion for both
    matrix = q4["imatrix"].split(" ")[0]  # computed once beside the shared f16 intermediate, for any type that takes one
    assert (results[0].intermediate.parent / matrix).is_file()


def test_kill_9_during_a_ladder_leaves_only_whole_files_and_a_rerun_resumes_from_the_cache(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tandemlm.models.gguf_info import read_gguf_info
    from tandemlm.testing.tiny_models import tiny_model

    env = {**os.environ, "TANDEM_CACHE": str(tmp_path / "cache")}
    folder = tmp_path / "ladder"
    command = [sys.executable, "-m", "tandemlm.cli.main", "quantize", str(tiny_model("llama")), "--type", "q8_0,q4_0",
               "--imatrix", "none", "--no-speed", "--threads", "1", "--out", str(folder)]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    first = folder / f"{tiny_model('llama').name}-Q8_0.gguf"
    deadline = time.monotonic() + 300
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)  # while the second type is under way
    child.wait()
    assert first.exists(), "the first type should have been published before the kill"
    for path in folder.iterdir():  # only whole files under final names: each reads back as a GGUF or is JSON/PNG
        assert not path.name.startswith(".") and not path.name.endswith((".partial", ".unverified")), path
        if path.suffix == ".gguf":
            read_gguf_info(path)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "reusing verified Q8_0 from the cache" in rerun.stderr
    assert json.loads((folder / "ladder.json").read_text())["cards"][1]["type"] == "Q4_0"
