"""Run machinery: resume after kill -9, complete-checkpoint detection, metrics, plots, hacking warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandemlm.align.callbacks import HackingWatch, hacking_signature
from tandemlm.align.errors import ConfigError
from tandemlm.align.metrics import read_metrics, truncate_metrics
from tandemlm.align.run import Run, prepare_run
from tandemlm.align.run_folder import RunFolder, complete_checkpoints
from tandemlm.align.sft import SFTRunConfig


def _sft_command(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tandemlm.cli.main", "align", "sft", "--model", str(model), "--dataset", "builtin:sft_train",
        "--batch-size", "2", "--max-length", "48", "--threads", "1", "--save-steps", "2", "--lr-scheduler", "constant",
        "--output-dir", str(out), *extra,
    ]


def test_resume_after_kill_9_loses_at_most_one_checkpoint_interval(tiny_llama, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(_sft_command(tiny_llama, out, "--max-steps", "200"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not [c for c in complete_checkpoints(out / "checkpoints") if int(c.name.split("-")[1]) >= 4]:
            assert process.poll() is None, "training exited before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-4 within 300 s"
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    logged_before = max(r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    last_complete = int(complete_checkpoints(out / "checkpoints")[-1].name.split("-")[1])
    assert logged_before - last_complete <= 2  # at most save_steps steps are redone
    torn = out / "checkpoints" / "checkpoint-999"  # what a kill in the middle of a save leaves
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_st')

    target = last_complete + 2
    result = subprocess.run(_sft_command(tiny_llama, out, "--max-steps", str(target), "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["sessions"][-1]["resumed_from"] == f"checkpoint-{last_complete}"
    assert info["global_step"] == target and info["status"] == "finished"
    assert not torn.exists()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, target + 1))  # the redone steps replaced, not duplicated


def test_new_run_refuses_a_used_folder_and_resume_needs_one(tmp_path, tiny_llama):
    config = SFTRunConfig(model=str(tiny_llama), dataset="builtin:sft_train", output_dir=str(tmp_path / "run"))
    prepare_run(config, tiny_llama)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        prepare_run(config, tiny_llama)
    empty = SFTRunConfig(model=str(tiny_llama), dataset="builtin:sft_train", output_dir=str(tmp_path / "new"), resume=True)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        prepare_run(empty, tiny_llama)
    other = SFTRunConfig(model=str(tiny_llama), dataset="builtin:prefs_train", output_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(ConfigError, match=r"--resume: dataset is 'builtin:prefs_train' but the run .* used 'builtin:sft_train'"):
        prepare_run(other, tiny_llama)


def test_complete_checkpoints_and_metrics_truncation(tmp_path):
    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(metrics, 4)
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]


def test_hacking_signature():
    flat, rising = [0.5] * 10, [0.1 * i for i in range(10)]
    longer = [20 + 4 * i for i in range(10)]
    assert "reward-hacking signature" in hacking_signature(longer, flat)
    assert hacking_signature(longer, rising) is None  # longer answers that score better are fine
    assert hacking_signature([20.0] * 10, flat) is None
    assert hacking_signature(longer[:6], flat[:6]) is None  # too little history to say


def test_hacking_watch_warns_once_in_metrics_and_run_json(tmp_path):
    run = Run(tmp_path, SFTRunConfig())
    (tmp_path / "run.json").write_text("{}")
    watch = HackingWatch(run, window=2)
    for step in range(1, 8):
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        watch.on_log(None, state, None, logs={"completions/mean_length": 10.0 * step, "rewards/verifier/mean": 0.3})
    warnings = [r for r in read_metrics(run.metrics) if "warning" in r]
    assert len(warnings) == 1 and len(run.info()["warnings"]) == 1


def test_plots_are_drawn_for_logged_quantities(tmp_path):
    from tandemlm.align.plots import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1 / s, "kl": 0.01 * s, "rewards/verifier/mean": 0.1 * s, "completions/mean_length": 20 + s,
             "rewards/margins": 0.2 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s} for s in range(1, 6)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = {p.name for p in plot_metrics(metrics, tmp_path / "plots")}
    assert written == {"loss.png", "reward.png", "kl.png", "margins.png", "length.png"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(written)  # no temp PNG left
    assert [p.name for p in RunFolder(tmp_path).plot_files()] == sorted(written)


def test_run_folder_read_info_tolerates_what_a_reader_may_meet(tmp_path):
    # The UI lists any folder through RunFolder.read_info; only training needs the strict info().
    run = RunFolder(tmp_path)
    assert run.read_info() == {}
    for text in ("[1, 2]", '{"method": "sf', "\xff"):
        (tmp_path / "run.json").write_text(text, encoding="latin-1")
        assert run.read_info() == {}
    (tmp_path / "run.json").write_text('{"method": "dpo"}')
    assert run.read_info() == {"method": "dpo"} and run.config_file == tmp_path / "config.yaml"


def test_a_failing_run_is_marked_failed_and_a_finished_one_resumes_to_nothing(tmp_path, tiny_llama):
    from tandemlm.align.errors import RunFinished
    from tandemlm.align.run import Method

    config = SFTRunConfig(model=str(tiny_llama), dataset="builtin:sft_train", output_dir=str(tmp_path / "run"), max_steps=3)

    def crashes(c):
        prepare_run(c, tiny_llama)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        Method(SFTRunConfig, crashes, "x").start(config)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: out of memory"

    resumed = SFTRunConfig(**{**config.__dict__, "resume": True})
    run = prepare_run(resumed, tiny_llama)  # a failed run resumes
    run.update_info(status="finished", global_step=3)
    with pytest.raises(RunFinished, match=r"already finished \(3 steps; its result is in .*final\); nothing to resume"):
        prepare_run(resumed, tiny_llama)
    assert prepare_run(SFTRunConfig(**{**resumed.__dict__, "max_steps": 5}), tiny_llama).info()["status"] == "running"


def test_resume_refuses_settings_the_checkpoint_restores_and_records_other_changes(tmp_path, tiny_llama):
    config = SFTRunConfig(model=str(tiny_llama), dataset="builtin:sft_train", output_dir=str(tmp_path / "run"), learning_rate=1e-4)
    prepare_run(config, tiny_llama)
    faster = SFTRunConfig(**{**config.__dict__, "resume": True, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"--resume: learning_rate is 0.001 but the run .* used 0.0001, and a resumed optimizer"):
        prepare_run(faster, tiny_llama)
    run = prepare_run(SFTRunConfig(**{**config.__dict__, "resume": True, "save_steps": 7}), tiny_llama)
    sessions = run.info()["sessions"]
    assert "changed" not in sessions[0] and sessions[-1]["changed"] == {"save_steps": [config.save_steps, 7]}
