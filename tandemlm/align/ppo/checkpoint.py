"""RL checkpoints that resume exactly: weights, optimizers, schedulers, KL controller, RNGs, data cursor.

A checkpoint is built in ``checkpoints/.checkpoint-N.partial`` and renamed to ``checkpoint-N``
only when every file is written, with ``trainer_state.json`` (the marker ``run_folder`` checks)
written last inside it: a kill -9 mid-save leaves a ``.partial`` folder that is never taken for a
whole checkpoint. Weights are safetensors; optimizer, scheduler and RNG states are tensors and
plain numbers saved with ``torch.save`` and read back with ``weights_only=True`` (no pickled code).

Files::

    actor.safetensors        the actor's LoRA weights (or the full actor)
    critic.safetensors       the critic's LoRA weights (or the full critic backbone); PPO only
    value_head.safetensors   the value head; PPO only
    optim.pt                 both optimizers and both schedulers (under ZeRO: optim-<rank>.pt, each
                             process's shard of the optimizer states)
    rng-<rank>.pt            torch (CPU and CUDA), Python and NumPy RNG states of each process
    trainer_state.json       step, data cursor, KL controller; written last
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.policy import CRITIC, POLICY, ActorCritic
from tandemlm.align.run import gathered
from tandemlm.storage.atomic import replace_dir
from tandemlm.storage.pickle_guard import refused_pickle

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every RNG a PPO step draws from."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def lora_weights(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    """The PEFT state dict of ``adapter`` on ``model``, whole (ZeRO-3 shards gathered; every process calls this)."""
    from peft import get_peft_model_state_dict

    with gathered([p for n, p in model.named_parameters() if f".{adapter}." in n]):
        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict, whole (ZeRO-3 shards gathered), tied tensors once; every process calls this."""
    with gathered(list(module.parameters())):
        named = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    seen: dict[tuple[int, ...], str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):  # tied duplicates: keep the first name
        key = (id(param),)
        if key in seen and name in named:
            del named[name]
        seen.setdefault(key, name)
    return named


def trained_weights(ac: ActorCritic) -> dict[str, dict[str, torch.Tensor]]:
    """File stem -> tensors of everything the run trains (every process must call this under ZeRO-3).

    ``actor`` always; ``critic`` and ``value_head`` only for PPO (the critic-free algorithms have none).
    """
    weights = {"actor": lora_weights(ac.model, POLICY) if ac.lora else full_weights(ac.model)}
    if not ac.has_critic:
        return weights
    weights["critic"] = lora_weights(ac.critic_model, CRITIC) if ac.lora else full_weights(ac.critic_model)
    return {**weights, "value_head": full_weights(ac.value_head)}


def save_weights(ac: ActorCritic, folder: Path | None) -> None:
    """actor, critic and value head as safetensors in ``folder`` (None: this process only helps gather)."""
    from safetensors.torch import save_file

    weights = trained_weights(ac)
    if folder is not None:
        for stem, tensors in weights.items():
            save_file(tensors, str(folder / f"{stem}.safetensors"))


def load_weights(ac: ActorCritic, folder: Path) -> None:
    from safetensors.torch import load_file, load_model

    # Under ZeRO-3 every process reads the same files into the gathered weights; rank 0's are re-partitioned.
    with gathered([p for _, p in ac.trained()], modifier_rank=0):
        if ac.lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(ac.model, load_file(str(folder / "actor.safetensors")), adapter_name=POLICY)
            if ac.has_critic:
                set_peft_model_state_dict(ac.critic_model, load_file(str(folder / "critic.safetensors")), adapter_name=CRITIC)
            ac.model.set_adapter(POLICY)
        else:
            load_model(ac.model, str(folder / "actor.safetensors"))
            if ac.has_critic:
                load_model(ac.critic_model, str(folder / "critic.safetensors"))
        if ac.value_head is not None:
            ac.value_head.load_state_dict(load_file(str(folder / "value_head.safetensors")))


class Processes(Protocol):
    """The processes that write a checkpoint together (one, or a data-parallel group): the trainer's Distributed."""

    rank: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


def save_checkpoint(
    checkpoints: Path, step: int, ac: ActorCritic, *, training: dict[str, Any], state: dict[str, Any],
    processes: Processes, keep: int,
) -> Path:
    """Writes checkpoint-``step`` atomically; ``training`` holds optimizer/scheduler state dicts, ``state`` the
    trainer's progress; every process calls it, the main one publishes; the newest ``keep`` are kept."""
    rank, is_main, barrier = processes.rank, processes.is_main, processes.barrier
    target = checkpoints / f"checkpoint-{step}"
    staging = checkpoints / f".checkpoint-{step}.partial"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    save_weights(ac, staging if is_main else None)
    if is_main and not training.get("sharded"):
        torch.save(training, staging / "optim.pt")
    barrier()
    torch.save(rng_state(), staging / f"rng-{rank}.pt")
    if training.get("sharded"):  # ZeRO: each process keeps its own shard of the optimizer state
        torch.save(training, staging / f"optim-{rank}.pt")
    barrier()
    if is_main:
        (staging / STATE_FILE).write_text(json.dumps({"global_step": step, **state}, indent=2) + "\n")
        replace_dir(staging, target)
        prune(checkpoints, keep)
    barrier()
    return target


def prune(checkpoints: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` complete checkpoints (only after a newer one is whole)."""
    found = sorted(
        (int(p.name.split("-")[1]), p) for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(folder: Path, ac: ActorCritic, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores weights and this process's RNGs; returns (optimizer/scheduler states, trainer state)."""
    load_weights(ac, folder)
    rng_file = folder / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"--resume: {folder} was saved by fewer processes (no {rng_file.name}); resume with as many")
    optim = folder / "optim.pt" if (folder / "optim.pt").is_file() else folder / f"optim-{rank}.pt"
    if not optim.is_file():  # a ZeRO checkpoint holds one optimizer shard per process
        raise ConfigError(f"--resume: {folder} has no optim.pt or {optim.name}; resume with the launch that saved it")
    with refused_pickle(optim):
        training = torch.load(optim, weights_only=True)
    with refused_pickle(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return training, json.loads((folder / STATE_FILE).read_text())
