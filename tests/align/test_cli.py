"""`tandem align ...` as a user runs it: flags mirror the config, errors are one line, data fails first."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()


def test_method_help_lists_every_config_field_with_help():
    result = runner.invoke(app, ["align", "grpo", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--preset", "--config", "--dataset", "--output-dir", "--max-steps", "--model", "--resume", "--lora-layers", "--num-generations", "--rewards"):
        assert flag in result.output


def test_bad_flag_value_is_one_line_naming_the_field():
    result = runner.invoke(app, ["align", "dpo", "--preset", "cpu-demo", "--beta", "-1"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: beta must be positive, got -1.0"


def test_bad_data_fails_before_any_model_loads(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": []}) + "\n")
    # A model that does not exist: reaching the model would fail differently, so the data error proves the order.
    result = runner.invoke(app, ["align", "dpo", "--model", str(tmp_path / "no-model"), "--dataset", str(data), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {data} row 1: field 'chosen' is a string, not a conversation" in result.output
    assert not (tmp_path / "run").exists()  # nothing half-made


def test_unknown_preset_lists_known_ones():
    result = runner.invoke(app, ["align", "sft", "--preset", "fast"])
    assert result.exit_code == 2 and "known presets: cpu-demo" in result.output


def test_make_data_and_list(tmp_path):
    result = runner.invoke(app, ["align", "make-data", str(tmp_path), "--seed", "3", "--per-country", "1", "--arithmetic", "10"])
    assert result.exit_code == 0, result.output
    assert "prefs_train.jsonl\t99 rows" in result.output and "arithmetic_train.jsonl\t10 rows" in result.output
    listing = runner.invoke(app, ["align", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0
    for name in ("sft", "reward", "dpo", "kto", "grpo", "verifier", "reward_model", "capitals_test"):
        assert name in listing.output


def test_merge_and_eval_fail_cleanly_on_a_non_run(tmp_path):
    for command in (["merge", str(tmp_path)], ["align", "eval", str(tmp_path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "is not a run folder" in result.output
