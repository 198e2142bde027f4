"""`tandem align` runs unchanged under `accelerate launch`: 2 CPU processes (gloo) end with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate"


def test_two_cpu_processes_finish_with_identical_weights(tiny_llama, tmp_path):
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu.yaml"), "-m", "tandemlm.cli.main",
        "align", "sft", "--model", str(tiny_llama), "--dataset", "builtin:sft_train", "--max-steps", "2",
        "--batch-size", "2", "--max-length", "48", "--threads", "1", "--output-dir", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    digests = info["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks took the same optimizer steps
    assert info["status"] == "finished" and (out / "final" / "model.safetensors").is_file()


def test_ppo_on_two_cpu_processes_keeps_both_ranks_identical(tiny_llama, tmp_path):
    """Each rank rolls out its own prompts; averaged gradients keep actor, critic and value head equal on both."""
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIGS / "cpu.yaml"), "-m", "tandemlm.cli.main",
        "align", "ppo", "--model", str(tiny_llama), "--dataset", "builtin:capitals_train", "--lora", "--max-steps", "2",
        "--batch-size", "2", "--minibatch-size", "2", "--ppo-epochs", "1", "--max-completion-length", "6",
        "--max-length", "96", "--threads", "1", "--learning-rate", "1e-2", "--output-dir", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    digests = info["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert info["status"] == "finished" and (out / "final" / "adapter_model.safetensors").is_file()


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("cpu", "ddp", "zero2", "zero3"):
        config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
        assert config.num_processes == 2, name
    stages = {n: yaml.safe_load((ACCELERATE_CONFIGS / f"{n}.yaml").read_text())["deepspeed_config"]["zero_stage"] for n in ("zero2", "zero3")}
    assert stages == {"zero2": 2, "zero3": 3}
