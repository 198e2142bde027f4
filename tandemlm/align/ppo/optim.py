"""The actor's and the critic's optimizer steps: local (one process or plain data parallel) or DeepSpeed ZeRO.

PPO steps the actor and the critic separately, each with its own learning rate and its own gradient
clip (their losses differ in scale; one shared norm would let the value loss starve the policy).
A DeepSpeed engine owns one module and one optimizer and clips one norm over everything it owns, so
under ``accelerate launch`` with a ZeRO config each role gets an engine of its own
(:class:`EngineStep`), the layout DeepSpeed-Chat uses. Gradients accumulate locally over a
minibatch's micro-batches and are reduced once per step (``managed_gradient_accumulation: false``),
exactly what :class:`LocalStep` does by hand, so a ZeRO run follows the data-parallel one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from tandemlm.align.launch import under_deepspeed


class OptimizerStep(Protocol):
    """One role's optimizer: ``backward`` each micro-batch's loss, then ``step`` once per minibatch."""

    optimizer: torch.optim.Optimizer  # the torch optimizer (its param groups carry the scheduled lr)

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Reduces, clips and applies the accumulated gradients; returns their norm before clipping."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def zero_stage() -> int:
    """The ZeRO stage ``accelerate launch`` asked for (0: not under DeepSpeed)."""
    if not under_deepspeed():
        return 0
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def load_weights_whole() -> None:
    """Makes transformers load models whole in this process, not sharded as they load (``zero.Init``).

    A ZeRO-3 trainer that ran earlier in the process (TRL's, through accelerate) leaves transformers
    set to shard every model it builds. PPO copies the base (critic, reference) and loads a reward
    model that no engine owns; sharded, those would be empty tensors with no hooks to gather them.
    Its engines shard the actor and the critic when they start instead.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


class GradientAverager(Protocol):
    """What a local step needs of the process group (the trainer's Distributed): averaging gradients."""

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None: ...


class LocalStep:
    """AdamW with gradients averaged over processes by hand (a no-op in one process) and clipped."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, max_grad_norm: float, dist: GradientAverager) -> None:
        self.params, self.max_grad_norm, self.dist = params, max_grad_norm, dist
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        self.dist.average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def deepspeed_config(stage: int, max_grad_norm: float, bf16: bool, world: int) -> dict[str, Any]:
    """The engine config: ``stage`` as launched, our clip, gradients reduced only in ``step()``."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the loop sizes its own micro-batches
        "train_batch_size": world,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # backward() accumulates, step() reduces and updates
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": stage, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, as the one-process loop uses
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class EngineStep:
    """A DeepSpeed engine around ``module`` stepping AdamW over ``params`` (the rest of ``module`` is frozen)."""

    def __init__(self, module: torch.nn.Module, params: list[torch.nn.Parameter], lr: float, config: dict[str, Any]) -> None:
        import deepspeed

        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=config)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already weighs each micro-batch

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state over this process's shard (ZeRO hands it the flat fp32 partitions): tensors only."""
        with self._shards_in_param_groups():
            return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the shard's AdamW state; call after the weights are loaded, whose values it takes as
        the fp32 master copy (ZeRO would otherwise step from the weights it held before the resume)."""
        with self._shards_in_param_groups():
            self.optimizer.load_state_dict(state)
        self.engine.optimizer.refresh_fp32_params()

    @contextmanager
    def _shards_in_param_groups(self) -> Iterator[None]:
        """ZeRO-2 leaves its fp32 shards in AdamW's param groups; ZeRO-3 puts them there only to save or
        load (as its own checkpointing does), else AdamW's state has no params to be keyed by."""
        zero = self.engine.optimizer
        lends = hasattr(zero, "_set_fp32_optimizer_param_groups")  # ZeRO-3's optimizer
        if lends:
            zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            if lends:
                zero._clear_fp32_optimizer_param_groups()
