"""``scripts/gpu_check.sh`` cannot rot: its CPU dry run runs every step of the GPU check on tiny configs here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(*args: str, out: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TANDEM_FIXTURES", None)
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                          check=False)


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_prints_measured_beside_plan(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    done = run_script("--cpu-dry-run", out=tmp_path, timeout=480)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for step in ("[1/4] environment (cpu)", "[2/4] gpu-marked tests", "[3/4] PPO memory bench (tiny-64,tiny-256)",
                 "[4/4] DPO and GRPO memory bench (tiny-64)", "gpu_check: all steps ran"):
        assert step in output, f"missing {step!r}:\n{output[-3000:]}"
    assert "6 skipped" in output  # both test files import and their gpu tests are collected (they skip on CPU)
    table = (tmp_path / "ppo_gpu_memory.txt").read_text()
    assert "measured MiB  plan MiB  measured/plan" in table and table in output.replace("\r", "")
    results = json.loads((tmp_path / "ppo_gpu_memory.json").read_text())["results"]
    assert [r["size"] for r in results] == ["tiny-64", "tiny-256"]
    for r in results:
        assert "error" not in r, r
        assert r["measured_peak_mb"] > 0 and r["plan_peak_mb"] > 0 and r["step_s"] > 0 and r["steps"] == 2
        assert 0.5 < r["measured_peak_mb"] / r["plan_peak_mb"] < 2.0  # the plan is in the right range on CPU too
    assert (tmp_path / "gpu_tests.xml").is_file()
    align_table = (tmp_path / "align_gpu_memory.txt").read_text()
    assert "method  size     params  dtype  measured MiB  plan MiB  measured/plan  s/step" in align_table
    assert align_table in output.replace("\r", "")
    rows = {line.split()[0]: line for line in align_table.splitlines()[2:]}  # after the title and header
    assert set(rows) == {"dpo", "grpo"} and all("tiny-64" in row for row in rows.values())
    assert "no plan" in rows["dpo"] and "no plan" not in rows["grpo"]  # GRPO is our trainer: the plan covers it
    aligned = json.loads((tmp_path / "align_gpu_memory.json").read_text())["results"]
    assert [(r["method"], r["size"]) for r in aligned] == [("dpo", "tiny-64"), ("grpo", "tiny-64")]
    for r in aligned:
        assert "error" not in r, r
        assert r["measured_peak_mb"] > 0 and r["step_s"] > 0 and r["steps"] == 2
        assert r["dtype"] == "fp32" and math.isfinite(r["loss"])
    dpo, grpo = aligned
    assert dpo["plan_peak_mb"] is None and dpo["plan"] == "no plan"
    assert grpo["plan"] == "plan.estimate" and grpo["plan_peak_mb"] > 0
    assert f"{grpo['plan_peak_mb']:.0f}" in rows["grpo"].split()  # the table shows the JSON's plan
    assert 0.5 < grpo["measured_peak_mb"] / grpo["plan_peak_mb"] < 2.0  # the critic-free plan is in range on CPU too
    assert grpo["mean_completion_length"] == 8  # random weights never stop early: full generations
    assert grpo["rollout_logprob_diff"] is not None  # tandem's GroupTrainer ran (it checks the sampler on step 1)


def test_gpu_mode_and_bad_options_fail_in_one_line(tmp_path: Path) -> None:
    done = run_script("--bogus")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown option '--bogus' (use --prepare, --cpu-dry-run or nothing)"
    done = run_script()  # the GPU mode without $OUT
    assert done.returncode == 2 and done.stderr.strip() == "error: $OUT is not set (the folder results go to)"


def run_bench(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "bench" / name), *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, check=False)


@pytest.mark.parametrize("bench", ["ppo_gpu_memory.py", "align_gpu_memory.py"])
def test_bench_refuses_an_unknown_size(bench: str) -> None:
    done = run_bench(bench, "--sizes", "3b")
    assert done.returncode == 2 and "--sizes: unknown 3b; known: 0.5b, 1.5b, 7b, tiny-64, tiny-256" in done.stderr


def test_align_bench_refuses_an_unknown_method() -> None:
    done = run_bench("align_gpu_memory.py", "--methods", "dpo,kto")
    assert done.returncode == 2 and "--methods: unknown kto; known: dpo, grpo" in done.stderr


def test_jobs_past_the_check_budget_are_skipped_not_started(tmp_path: Path) -> None:
    done = run_bench("align_gpu_memory.py", "--sizes", "0.5b,7b", "--budget", "10", "--tokenizer", "unused",
                     "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "align bench:" not in done.stdout  # no job started: 10 s is under the least a job gets
    results = json.loads((tmp_path / "align_gpu_memory.json").read_text())["results"]
    assert [(r["method"], r["size"]) for r in results] == [("dpo", "0.5b"), ("grpo", "0.5b"), ("dpo", "7b"), ("grpo", "7b")]
    assert all(r == {"method": r["method"], "size": r["size"], "skipped": "the check's time budget ran out"} for r in results)
    assert done.stdout.count("skipped: the check's time budget ran out") == 4


def test_prebuilt_fixture_folder_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tandemlm.errors import EngineError
    from tandemlm.testing.tiny_models import SPEC_FILE, tiny_model

    monkeypatch.setenv("TANDEM_FIXTURES", str(tmp_path))
    with pytest.raises(EngineError, match=f"no prebuilt tiny-llama in {tmp_path}"):
        tiny_model("llama")
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / SPEC_FILE).write_text("{}")
    assert tiny_model("llama") == tmp_path / "tiny-llama"


def test_setup_names_its_options_on_a_bad_one() -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "--cuda"], capture_output=True, text=True,
                          timeout=30, cwd=REPO, check=False)
    assert done.returncode == 2 and done.stderr.strip() == "error: unknown option --cuda (use --dev, --gpu or both)"
