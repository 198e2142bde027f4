"""``scripts/gpu_check.sh`` cannot rot: its CPU dry run runs every step of the GPU check on tiny configs here."""

from __future__ import annotations

import json
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
    done = run_script("--cpu-dry-run", out=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for step in ("[1/3] environment (cpu)", "[2/3] gpu-marked tests", "[3/3] PPO memory bench (tiny-64,tiny-256)",
                 "gpu_check: all steps ran"):
        assert step in output, f"missing {step!r}:\n{output[-3000:]}"
    assert "5 skipped" in output  # both test files import and their gpu tests are collected (they skip on CPU)
    table = (tmp_path / "ppo_gpu_memory.txt").read_text()
    assert "measured MiB  plan MiB  measured/plan" in table and table in output.replace("\r", "")
    results = json.loads((tmp_path / "ppo_gpu_memory.json").read_text())["results"]
    assert [r["size"] for r in results] == ["tiny-64", "tiny-256"]
    for r in results:
        assert "error" not in r, r
        assert r["measured_peak_mb"] > 0 and r["plan_peak_mb"] > 0 and r["step_s"] > 0 and r["steps"] == 2
        assert 0.5 < r["measured_peak_mb"] / r["plan_peak_mb"] < 2.0  # the plan is in the right range on CPU too
    assert (tmp_path / "gpu_tests.xml").is_file()


def test_gpu_mode_and_bad_options_fail_in_one_line(tmp_path: Path) -> None:
    done = run_script("--bogus")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown option '--bogus' (use --prepare, --cpu-dry-run or nothing)"
    done = run_script()  # the GPU mode without $OUT
    assert done.returncode == 2 and done.stderr.strip() == "error: $OUT is not set (the folder results go to)"


def test_bench_refuses_an_unknown_size() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "ppo_gpu_memory.py"), "--sizes", "3b"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert done.returncode == 2 and "--sizes: unknown 3b; known: 0.5b, 1.5b, 7b, tiny-64, tiny-256" in done.stderr


def test_prebuilt_fixture_folder_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tandemlm.errors import EngineError
    from tandemlm.fixtures import SPEC_FILE, tiny_model

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
