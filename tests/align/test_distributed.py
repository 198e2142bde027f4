"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes: every method ends where the one-process run ends.

Each stage is one ``accelerate launch`` of the shipped ``recipes/accelerate/zero{2,3}.yaml`` running
sft, reward, dpo, kto, grpo and ppo one after another (tests/align/distributed_runs.py), so the processes
start once per stage. The one-process runs train in this process with the same seed and the same
global batch (2 processes x per-device batch = one process x twice the batch) on 2 rows, full weights.

Tolerance: two Adam steps at lr 1e-3 move weights by up to 2e-3; the ZeRO runs must stay within
1e-4 of the one-process run (seen: 5e-5 at most, from the order of float reductions).
GRPO and PPO (our own RL trainer) sample their completions per process, so a one-process run draws
others; their ZeRO-2 and ZeRO-3 runs (same per-process sampling) must agree with each other and with
their plain data-parallel run on 2 processes instead: GRPO with full weights, PPO (an engine each for
actor and critic) with full weights and LoRA (the critic's adapter then sits on its own base copy).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import one_batch, state_dict_of

from tandemlm.align.launch import ACCELERATE_CONFIGS, launch_env

DRIVER = Path(__file__).with_name("distributed_runs.py")
STAGES = ("zero2", "zero3")
METHODS = ("sft", "reward", "dpo", "kto", "grpo", "ppo", "ppo-lora")  # a run's name; its method before "-"
SAMPLED = ("grpo", "ppo", "ppo-lora")  # compared across stages, not with one process
WITH_DDP = ("grpo", "ppo", "ppo-lora")  # also launched with plain data parallel (cpu.yaml) to compare with
TOLERANCE = 1e-4
ZERO3_VLLM = "rollout_backend: vllm needs the whole actor adapter in each process; use --distributed zero2 or ddp"
MOVED = 1e-3  # the largest change two steps must make, so equal weights are not equal by standing still
COMMON: dict[str, Any] = {
    "max_steps": 2, "max_length": 64, "threads": 1, "save_steps": 50, "logging_steps": 1,
    "learning_rate": 1e-3, "lr_scheduler": "constant", "lora": False, "seed": 0,
}  # fmt: skip


def per_device(method: str, data: dict[str, str], reward_model: Path) -> dict[str, Any]:
    """``method``'s config for each of 2 processes (the one-process run doubles ``batch_size``)."""
    table: dict[str, dict[str, Any]] = {
        "sft": {"dataset": data["sft"], "batch_size": 1},
        "reward": {"dataset": data["prefs"], "batch_size": 1},
        "dpo": {"dataset": data["prefs"], "batch_size": 1},
        "kto": {"dataset": data["prefs"], "batch_size": 2},  # 2 pairs unpaired: 4 rows
        "grpo": {
            "dataset": "builtin:capitals_train", "batch_size": 2, "num_generations": 2, "max_completion_length": 6,
            "rewards": "reward_model", "reward_model": str(reward_model), "beta": 0.0,
        },
        "ppo": {
            "dataset": "builtin:capitals_train", "batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1,
            "max_completion_length": 6, "max_length": 96, "rewards": "reward_model", "reward_model": str(reward_model),
        },
    }  # fmt: skip
    table["ppo-lora"] = {**table["ppo"], "lora": True}
    return {**COMMON, **table[method]}


def spec_entry(run: str, values: dict[str, Any]) -> dict[str, Any]:
    """The driver's entry for the run named ``run`` (``ppo-lora`` runs the ppo method)."""
    return {"method": run.split("-")[0], "config": values}


def launch_runs(stage: str, spec: list[dict[str, Any]], folder: Path) -> float:
    """Runs ``spec`` on 2 processes with ``stage``'s config; returns the wall time.

    ZeRO-2 runs as the README's multi-node recipe: two "machines" on this one (static rendezvous on
    127.0.0.1), one process each; ZeRO-3 as one machine with 2 processes.
    """
    spec_file = folder / f"{stage}.json"
    spec_file.write_text(json.dumps(spec))
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / f"{stage}.yaml"),
        "--num_processes", "2",
    ]  # fmt: skip
    if stage == "zero2":
        node = ["--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
        commands = [[*launch, *node, "--machine_rank", str(rank), str(DRIVER), str(spec_file)] for rank in (0, 1)]
    else:
        commands = [[*launch, str(DRIVER), str(spec_file)]]
    env = {**launch_env(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    logs = [folder / f"{stage}-{rank}.log" for rank in range(len(commands))]
    processes = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as stderr:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=folder))
    try:
        codes = [process.wait(timeout=560) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                kill_tree(process.pid)
    assert codes == [0] * len(commands), "\n".join(log.read_text()[-3000:] for log in logs)
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {"sft": one_batch("builtin:sft_train", 2, folder), "prefs": one_batch("builtin:prefs_train", 2, folder)}


@pytest.fixture(scope="module")
def one_process(tiny_llama: Path, data: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The one-process run of each compared method, in this process: final/ folders by method."""
    from tandemlm.align.config import build_config
    from tandemlm.align.registry import get_method, run_method

    out = tmp_path_factory.mktemp("one")
    finals = {}
    for method in METHODS:
        if method in SAMPLED:
            continue
        values = per_device(method, data, out / "reward")
        values.update(model=str(tiny_llama), output_dir=str(out / method), batch_size=2 * values["batch_size"])
        finals[method] = run_method(method, build_config(get_method(method).config_cls, overrides=values)).final
    return finals


@pytest.fixture(scope="module")
def zero_runs(tiny_llama: Path, data: dict[str, str], one_process: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run folders by ``stage/method``: one launch per stage (GRPO scores with the one-process reward model)."""
    runs = {}
    for stage in STAGES:
        folder = tmp_path_factory.mktemp(stage)
        spec = []
        for method in METHODS:
            values = {**per_device(method, data, one_process["reward"].parent), "model": str(tiny_llama)}
            spec.append(spec_entry(method, {**values, "output_dir": str(folder / method)}))
            runs[f"{stage}/{method}"] = folder / method
        seconds = launch_runs(stage, spec, folder)
        print(f"{stage}: {len(METHODS)} runs x 2 steps on 2 processes in {seconds:.0f} s", file=sys.stderr)
    folder = tmp_path_factory.mktemp("ddp")
    spec = []
    for method in WITH_DDP:
        values = {**per_device(method, data, one_process["reward"].parent), "model": str(tiny_llama)}
        spec.append(spec_entry(method, {**values, "output_dir": str(folder / method)}))
        runs[f"ddp/{method}"] = folder / method
    seconds = launch_runs("cpu", spec, folder)
    print(f"ddp: {len(WITH_DDP)} runs x 2 steps on 2 processes in {seconds:.0f} s", file=sys.stderr)
    return runs


def kill_tree(pid: int) -> None:
    """kill -9 on ``pid`` and everything it started: torchrun's workers run in sessions of their own."""
    import psutil

    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one sets up both launches (and, on a fresh cache, DeepSpeed's JIT build)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", METHODS)
def test_zero_run_ends_with_the_one_process_weights(method: str, stage: str, zero_runs, one_process, tiny_llama):
    from tandemlm.align.run import tensor_digest

    run = zero_runs[f"{stage}/{method}"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == 2
    assert len(info["sessions"]) == 1  # only the main process wrote run.json
    if method in WITH_DDP:
        check_rl_run(run, [zero_runs[f"{other}/{method}"] for other in ("ddp", *STAGES) if other != stage], tiny_llama)
        return
    saved = state_dict_of(run / "final")
    # rank_digests hash the full parameters on each rank (ZeRO-3 gathers its shards): the saved model's own.
    assert info["rank_digests"] == [tensor_digest(list(saved.items()))] * 2
    if method in SAMPLED:
        other = state_dict_of(zero_runs[f"{'zero3' if stage == 'zero2' else 'zero2'}/{method}"] / "final")
    else:
        other = state_dict_of(one_process[method])
    assert set(saved) == set(other)  # the tied output layer is saved once, as one process saves it
    assert max_difference(saved, other) <= TOLERANCE
    base = state_dict_of(tiny_llama)
    assert max(max_difference({k: saved[k]}, base) for k in saved if k in base) > MOVED


def check_rl_run(run: Path, others: list[Path], tiny_llama: Path) -> None:
    """An RL run's actor (and PPO's critic and value head) equal the other launches' and moved from where they began."""
    info = json.loads((run / "run.json").read_text())
    assert len(set(info["rank_digests"])) == 1  # both ranks hold the same actor, critic and value head
    critic = info["method"] == "ppo"
    assert (run / "final" / "critic").is_dir() == critic  # the critic-free algorithms save none
    parts = {"actor": run / "final", **({"critic": run / "final" / "critic"} if critic else {})}
    for name, folder in parts.items():
        saved = state_dict_of(folder)
        for other in others:
            theirs = state_dict_of(other / folder.relative_to(run))
            assert set(saved) == set(theirs), name
            assert max_difference(saved, theirs) <= TOLERANCE, f"{name} differs from {other}"
    actor = state_dict_of(parts["actor"])
    if (run / "final" / "adapter_config.json").is_file():  # LoRA: B starts at zero
        assert max(v.abs().max().item() for k, v in actor.items() if "lora_B" in k) > MOVED
    else:
        base = state_dict_of(tiny_llama)
        assert max(max_difference({k: actor[k]}, base) for k in actor if k in base) > MOVED
    if critic:
        value_head = state_dict_of(parts["critic"])["summary.weight"]
        assert value_head.abs().max().item() > 0  # the critic trained (it starts at zero)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ppo_resumed_under_zero3_ends_where_the_unbroken_run_ends(zero_runs, one_process, tiny_llama, data, tmp_path):
    """One step and a checkpoint, then ``resume`` to step 2 in a new launch: the unbroken ZeRO-3 run's weights.

    Step 2 lands there only if each process gets its shard of Adam's moments back and ZeRO's fp32
    master copy takes the loaded weights (else it steps from the adapters' initial values).
    """
    values = {**per_device("ppo-lora", data, one_process["reward"].parent), "model": str(tiny_llama)}
    values.update(output_dir=str(tmp_path / "run"), save_steps=1)
    launch_runs("zero3", [spec_entry("ppo-lora", {**values, "max_steps": 1})], tmp_path)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "checkpoint-1").glob("optim-*.pt")) == ["optim-0.pt", "optim-1.pt"]
    launch_runs("zero3", [spec_entry("ppo-lora", {**values, "resume": True})], tmp_path)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["global_step"] == 2 and info["sessions"][-1]["resumed_from"] == "checkpoint-1"
    check_rl_run(tmp_path / "run", [zero_runs["zero3/ppo-lora"]], tiny_llama)


@pytest.mark.slow
def test_zero3_run_killed_mid_way_resumes_to_the_same_step_count(tiny_llama, data, tmp_path):
    """``tandem align sft --distributed zero3``: kill -9 the whole launch after checkpoint 2, resume, 4 steps."""
    out = tmp_path / "run"
    args = [
        str(Path(sys.executable).with_name("tandem")), "align", "sft", "--distributed", "zero3", "--nproc", "2",
        "--model", str(tiny_llama), "--dataset", data["sft"], "--max-steps", "4", "--save-steps", "1",
        "--batch-size", "1", "--max-length", "64", "--threads", "1", "--no-lora", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "first.log"
    with log.open("w") as stderr:
        first = subprocess.Popen(args, stderr=stderr, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 400
        while not (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint-2 before the run ended"
            time.sleep(0.2)
    finally:
        kill_tree(first.pid)
        first.wait()
    assert "-m accelerate.commands.launch --config_file" in log.read_text().splitlines()[0]  # the command, on one line
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    result = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == 4
    assert int(info["sessions"][-1]["resumed_from"].split("-")[1]) >= 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["sft", "--distributed", "zero4"], "distributed must be one of ddp, zero2, zero3, got 'zero4'"),
        (["sft", "--nproc", "2"], "nproc needs distributed (ddp, zero2 or zero3)"),
        (["sft", "--distributed", "ddp", "--nproc", "0"], "nproc must be a positive integer, got 0"),
        (["ppo", "--distributed", "zero3", "--rollout-backend", "vllm"], ZERO3_VLLM),
    ],
)
def test_bad_distributed_flags_are_one_line_before_any_launch(flags, message, tmp_path):
    from typer.testing import CliRunner

    from tandemlm.cli.main import app

    result = CliRunner().invoke(app, ["align", *flags, "--dataset", "builtin:capitals_train", "--output-dir", str(tmp_path / "run")])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {message}")


def test_ppo_launched_with_zero3_and_vllm_rollouts_refuses_in_one_line(tmp_path):
    """``accelerate launch --config_file zero3.yaml ... align ppo --rollout-backend vllm`` (no --distributed)."""
    from typer.testing import CliRunner

    from tandemlm.cli.main import app

    args = ["align", "ppo", "--dataset", "builtin:capitals_train", "--rollout-backend", "vllm", "--output-dir", str(tmp_path / "run")]
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    result = CliRunner().invoke(app, args, env=env)
    assert (result.exit_code, result.output.strip()) == (2, f"error: {ZERO3_VLLM}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("mode", "cuda", "config"), [("ddp", False, "cpu.yaml"), ("ddp", True, "ddp.yaml"), ("zero3", False, "zero3.yaml")])
def test_launch_command_picks_the_config_for_the_hardware(mode, cuda, config):
    from tandemlm.align.launch import launch_command

    command = launch_command(mode, 3, ["sft", "--max-steps", "2"], cuda=cuda)
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", "3",
        "-m", "tandemlm.cli.main", "align", "sft", "--max-steps", "2",
    ]  # fmt: skip
