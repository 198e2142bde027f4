"""``tandem quantize RUN --eval``: an alignment run quantized (its adapter merged first) and its own
measures run on the unquantized and the quantized policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tandemlm.align.config import build_config
    from tandemlm.align.registry import get_method, run_method

    out = tmp_path_factory.mktemp("run") / "run"
    values = {"model": str(tiny_llama_dir), "output_dir": str(out), "dataset": "builtin:sft_train", "lora": True,
              "max_steps": 1, "batch_size": 2, "max_length": 64, "threads": 1,
              "eval_prompts": 4, "eval_max_new_tokens": 8}
    return run_method("sft", build_config(get_method("sft").config_cls, overrides=values)).dir


def test_a_run_is_merged_quantized_and_its_alignment_measured_on_both_policies(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["quantize", str(tiny_run), "--type", "q8_0", "--eval", "builtin:capitals_test", "--eval-prompts", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "retained.json").read_text())
    assert report["prompts"] == 4 and report["method"] == "sft" and report["datasets"] == ["builtin:capitals_test"]
    labels = list(report["policies"])
    assert labels[0].startswith("unquantized (") and labels[1] == "Q8_0"
    assert report["policies"][labels[0]]["same_answer_as_unquantized"] == 1.0
    assert set(report["policies"]["Q8_0"]) >= {"verifier_accuracy", "verifier_accuracy_change", "same_answer_as_unquantized"}
    change = report["policies"]["Q8_0"]["verifier_accuracy"] - report["policies"][labels[0]]["verifier_accuracy"]
    assert report["policies"]["Q8_0"]["verifier_accuracy_change"] == pytest.approx(change)
    files = {label: Path(path) for label, path in report["files"].items()}
    assert files["Q8_0"] == tmp_path / f"{tiny_run.name}-Q8_0.gguf" and files["Q8_0"].is_file()
    assert "alignment retained (4 held-out prompts" in result.output


def test_eval_without_a_run_and_adapter_with_a_run_are_refused_in_one_line(tiny_run: Path) -> None:
    refused = runner.invoke(app, ["quantize", "smollm2", "--eval", "builtin:capitals_test"])
    assert refused.exit_code != 0 and "--eval measures an alignment run's policy: MODEL must be a run folder" in refused.output
    refused = runner.invoke(app, ["quantize", str(tiny_run), "--adapter", str(tiny_run / "final")])
    assert refused.exit_code != 0 and "is an alignment run, whose own adapter is merged" in refused.output
    refused = runner.invoke(app, ["quantize", "smollm2", "--type", "q8_0,q4_0", "--serve"])
    assert refused.exit_code != 0 and "--serve after a ladder serves the smallest type within --max-kld: give --max-kld" in refused.output


def test_target_bpw_writes_a_mixed_file_within_the_budget_and_reports_it(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tandemlm.models.gguf_info import read_gguf_info

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mix.gguf"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--target-bpw", "6", "--imatrix", "none", "--out", str(out),
                                 "--report", "--no-speed", "--threads", "1"])
    assert result.exit_code == 0, result.output
    info = read_gguf_info(out)
    assert info.bits_per_weight <= 6.0
    assert len({t.type_name for t in info.tensors if len(t.shape) > 1}) > 1  # a mix, not one type
    card = json.loads(out.with_suffix(".report.json").read_text())["card"]
    assert card["bits_per_weight"] == pytest.approx(info.bits_per_weight) and card["kld_mean"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--target-bpw", "0"], "--target-bpw 0 must be a positive number of bits"),
    (["--target-bpw", "5", "--type", "q8_0,q4_0"], "--target-bpw makes one mixed file: drop the type list and --max-kld"),
])
def test_bad_target_bpw_is_refused_in_one_line_before_any_work(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["quantize", "smollm2", *args])
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "cache").exists()  # nothing converted or measured
