"""``--distributed ddp|zero2|zero3``: a run started for the user under ``accelerate launch``.

The launched processes run the same ``tandem align METHOD`` command (without ``--distributed``) with
one of the configs shipped in the package, ``tandemlm/align/accelerate/`` (``recipes/accelerate`` in a
source checkout links there): ``cpu.yaml`` or ``ddp.yaml`` for data parallel
(CPU processes over gloo, or one process per GPU), ``zero2.yaml``/``zero3.yaml`` for DeepSpeed. The
ZeRO configs leave mixed precision to the run's ``bf16`` field (auto: on with a GPU that has it), so
one file serves a CPU and a GPU. DeepSpeed JIT-compiles its shared-memory allreduce on a CPU the
first time (about a minute); :func:`launch_env` keeps the result in tandem's cache.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tandemlm.align.errors import ConfigError
from tandemlm.models.builtin import cache_dir

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate"  # package data: works from a wheel too
# --distributed value -> (config on a CPU, config with GPUs)
MODES: dict[str, tuple[str, str]] = {
    "ddp": ("cpu.yaml", "ddp.yaml"),  # plain data parallel: a full copy per process
    "zero2": ("zero2.yaml", "zero2.yaml"),  # DeepSpeed ZeRO-2: optimizer state and gradients sharded
    "zero3": ("zero3.yaml", "zero3.yaml"),  # DeepSpeed ZeRO-3: weights sharded too
}
DEEPSPEED_MODES = ("zero2", "zero3")


def inside_launch() -> bool:
    """Whether this process was started by ``accelerate launch``/torchrun (it sets ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def under_deepspeed() -> bool:
    """Whether ``accelerate launch`` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerate_config(mode: str, cuda: bool) -> Path:
    """The shipped accelerate config for ``mode`` on this hardware."""
    if mode not in MODES:
        raise ConfigError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")
    path = ACCELERATE_CONFIGS / MODES[mode][1 if cuda else 0]
    if not path.is_file():
        raise ConfigError(f"distributed: {path} is missing; reinstall tandemlm (the accelerate configs ship in the package)")
    if mode in DEEPSPEED_MODES:
        check_deepspeed()
    return path


def check_deepspeed() -> None:
    """DeepSpeed must be importable before processes are started for a ZeRO run."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("distributed: ZeRO needs DeepSpeed: pip install 'tandemlm[deepspeed]' (with DS_BUILD_OPS=0)")


def default_nproc(cuda: bool) -> int:
    """Every GPU, or 2 processes on a CPU."""
    if cuda:
        import torch

        return max(torch.cuda.device_count(), 1)
    return 2


def launch_command(mode: str, nproc: int, align_args: list[str], cuda: bool) -> list[str]:
    """``accelerate launch`` of ``tandem align ALIGN_ARGS`` in ``nproc`` processes with ``mode``'s config."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config(mode, cuda)), "--num_processes", str(nproc),
        "-m", "tandemlm.cli.main", "align", *align_args,
    ]  # fmt: skip


def launch_env() -> dict[str, str]:
    """The environment for the launched processes: DeepSpeed's JIT-built ops go to tandem's cache (once)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    return env


def launch(command: list[str]) -> int:
    """Prints ``command`` on one line (stderr) and runs it; returns its exit status."""
    print(shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, env=launch_env(), check=False).returncode
