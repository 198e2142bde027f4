"""`tandem align ...` as a user runs it: flags mirror the config, errors are one line, data fails first."""

from __future__ import annotations

import json
import os

import pytest
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
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": [{"role": "assistant", "content": "bye"}]}) + "\n")
    # A model that does not exist: reaching the model would fail differently, so the data error proves the order.
    result = runner.invoke(app, ["align", "dpo", "--model", str(tmp_path / "no-model"), "--dataset", str(data), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"error: {data} row 1: field 'chosen' is plain text but field 'prompt' is a conversation" in result.output
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


# ---- bad input is one line, before any model loads ---------------------------------------------------


@pytest.fixture
def loader_calls(monkeypatch):
    """Replaces the model and tokenizer loaders of every method with recorders that refuse to load."""
    from tandemlm.align import prepare
    from tandemlm.align.ppo import method as ppo_method

    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append(str(args[0]) if args else "?")
        raise AssertionError("a model loaded before the bad input was reported")

    for module in (prepare, ppo_method):
        monkeypatch.setattr(module, "load_model", refuse)
        monkeypatch.setattr(module, "load_tokenizer", refuse)
    return calls


def one_line_error(result, *names: str) -> str:
    """The single ``error: ...`` line of a refused command, which must name each of ``names``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["sft", "--lr-scheduler", "zigzag"], ["lr_scheduler", "cosine", "'zigzag'"]),
        (["dpo", "--loss-type", "magic"], ["loss_type", "'magic'", "sigmoid"]),
        (["kto", "--report-to", "carrier-pigeon"], ["report_to", "tensorboard"]),
        (["grpo", "--rewards", "verifier,reward_model", "--reward-model", "/no/such/run"], ["reward_model", "/no/such/run"]),
        (["ppo", "--kl-estimator", "k9"], ["kl_estimator", "k1, k3"]),
    ],
)
def test_closed_choices_fail_in_one_line_before_loading(tmp_path, loader_calls, args, names):
    result = runner.invoke(app, ["align", *args, "--dataset", "builtin:prefs_train", "--output-dir", str(tmp_path / "run")])
    one_line_error(result, *names)
    assert loader_calls == [] and not (tmp_path / "run").exists()


def test_yaml_config_values_and_bytes_fail_in_one_line(tmp_path, loader_calls):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text("method: dpo\nloss_type: magic\n")
    one_line_error(runner.invoke(app, ["align", "dpo", "--config", str(recipe)]), "loss_type", "'magic'")
    recipe.write_bytes(b"method: dpo\n# r\xe9sum\xe9\nbeta: 0.2\n")
    one_line_error(runner.invoke(app, ["align", "dpo", "--config", str(recipe)]), str(recipe), "line 2", "not UTF-8")
    assert loader_calls == []


def test_non_utf8_dataset_names_file_and_line(tmp_path, loader_calls):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "sft.jsonl"
    data.write_bytes(json.dumps(row).encode() + b"\n" + json.dumps(row).encode().replace(b"hello", b"h\xffllo") + b"\n")
    result = runner.invoke(app, ["align", "sft", "--dataset", str(data), "--output-dir", str(tmp_path / "run")])
    one_line_error(result, str(data), "line 2", "not UTF-8")
    assert loader_calls == [] and not (tmp_path / "run").exists()


def test_unwritable_output_dir_fails_before_loading(tmp_path, loader_calls):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    args = ["align", "sft", "--dataset", "builtin:sft_train", "--output-dir", str(blocker / "run")]
    one_line_error(runner.invoke(app, args), "output_dir", str(blocker))
    if os.geteuid() != 0:  # root writes through 0o500 (the case above covers root)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        args[-1] = str(locked / "run")
        one_line_error(runner.invoke(app, args), "output_dir", f"cannot write to {locked}")
    assert loader_calls == []


def test_pickle_only_checkpoint_is_one_line_naming_the_file(tmp_path, tiny_llama):
    import shutil

    import torch

    class Payload:  # what a malicious checkpoint holds: a call, not tensors (harmless here)
        def __reduce__(self):
            return (os.getcwd, ())

    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, model / name)
    torch.save({"model.embed_tokens.weight": Payload()}, model / "pytorch_model.bin")
    args = ["align", "sft", "--model", str(model), "--dataset", "builtin:sft_train", "--output-dir", str(tmp_path / "run"), "--threads", "1"]
    line = one_line_error(runner.invoke(app, args), str(model / "pytorch_model.bin"), "pickle", "safetensors")
    assert "weights_only" in line
