"""What every algorithm of the RL trainer shares: data order, rollout passes, optimizers, health, state.

``RLTrainer.train_step`` is one step of any algorithm: draw prompts, ``make_experience`` (sample,
score, advantages: the algorithm's own), ``update`` (the algorithm's own losses), then sync the
sampler and step the schedulers. PPO (``trainer.PPOTrainer``) adds a critic; the critic-free family
(``group_trainer.GroupTrainer``) adds groups. Under ``accelerate launch`` every process rolls out
its own prompts and gradients are averaged across processes before each optimizer step; with a
DeepSpeed ZeRO config each trained role steps in an engine of its own (``optim.py``).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.config import RLRunConfig
from tandemlm.align.ppo.optim import EngineStep, LocalStep, OptimizerStep, deepspeed_config, zero_stage
from tandemlm.align.ppo.policy import ActorCritic
from tandemlm.align.ppo.rollout import Rollout, Sampler
from tandemlm.align.ppo.scoring import RewardMix
from tandemlm.align.run_folder import process_state

SAMPLES_KEPT = 2  # responses per logged step written to samples.jsonl, for a person to read
# Undefined rather than broken: explained variance when every return is equal (e.g. all scores 0).
MAY_BE_NAN = ("explained_variance",)


class TrainingStopped(ConfigError):
    """The run stopped itself (NaN, exploding value loss, broken log-prob sync); one line naming step and quantity."""


@dataclass
class Cursor:
    """Where the data order is: ``epoch`` (its permutation is seeded by seed + epoch) and ``index`` into it."""

    epoch: int = 0
    index: int = 0


class Distributed:
    """This process's rank and the collective operations the loop needs (no-ops in one process)."""

    def __init__(self) -> None:
        self.state = process_state()
        self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def total(self, value: float) -> float:
        """The sum of ``value`` over processes."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes."""
        return self.total(value) / self.world

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (every process must call it)."""
        return self.total(float(flag)) > 0

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, by rank (plain Python objects)."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(found, value)
        return found

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world


class RLTrainer:
    """The loop around one algorithm; the caller owns the run folder, checkpoints and final save."""

    def __init__(
        self, config: RLRunConfig, ac: ActorCritic, tokenizer: Any, rows: list[dict[str, Any]],
        prompt_ids: list[list[int]], reward: RewardMix, dist: Distributed, total_steps: int, sampler: Sampler,
    ) -> None:
        from transformers import get_scheduler

        self.config, self.ac, self.tokenizer, self.reward, self.dist = config, ac, tokenizer, reward, dist
        self.rows, self.prompt_ids, self.sampler = rows, prompt_ids, sampler
        self.optimizers = optimizer_steps(config, ac, dist)
        self.schedulers = {
            role: get_scheduler(config.lr_scheduler, opt.optimizer, config.warmup_steps, total_steps)
            for role, opt in self.optimizers.items()
        }
        self.cursor = Cursor()
        self.step = 0
        self.samples_seen = 0  # responses generated so far, every process together
        self.last_samples: list[dict[str, Any]] = []  # a few (prompt, response, score) of the last rollout

    # ---- state for checkpoints ----------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sharded": isinstance(self.optimizers["actor"], EngineStep)}
        for role in self.optimizers:
            state[f"{role}_opt"] = self.optimizers[role].state_dict()
            state[f"{role}_sched"] = self.schedulers[role].state_dict()
        return state

    def load_training_state(self, training: dict[str, Any], state: dict[str, Any]) -> None:
        for role in self.optimizers:
            self.optimizers[role].load_state_dict(training[f"{role}_opt"])
            self.schedulers[role].load_state_dict(training[f"{role}_sched"])
        self.cursor = Cursor(**state["cursor"])
        self.step = int(state["global_step"])
        self.samples_seen = int(state.get("samples_seen", 0))

    def progress_state(self) -> dict[str, Any]:
        """What trainer_state.json keeps besides the step: JSON values only."""
        return {"cursor": vars(self.cursor), "samples_seen": self.samples_seen}

    # ---- data ---------------------------------------------------------------------------------------

    def next_batch(self) -> list[int]:
        """This process's prompt indices for the next draw; a new epoch starts when one runs out."""
        per_process = self.config.prompts_per_step
        need = per_process * self.dist.world
        if self.cursor.index + need > len(self.rows):
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.config.seed + self.cursor.epoch))
        start = self.cursor.index + self.dist.rank * per_process
        self.cursor.index += need
        return order[start : start + per_process].tolist()

    # ---- one step -----------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One step of the algorithm; returns its metrics."""
        started = time.monotonic()
        rollout, stats = self.make_experience(self.next_batch())
        rolled = time.monotonic()
        stats.update(self.update(rollout))
        self.step += 1
        self.sampler.sync(self.ac, self.step)
        for scheduler in self.schedulers.values():
            scheduler.step()
        elapsed = time.monotonic() - started
        generated = stats.pop("_generated_samples", float(len(rollout)))
        self.samples_seen += int(self.dist.total(generated))
        stats.update(rollout_s=rolled - started, update_s=time.monotonic() - rolled, peak_memory_mb=peak_memory_mb())
        stats["tokens_per_s"] = stats.pop("_generated_tokens") / max(stats["rollout_s"], 1e-9)
        stats["samples"] = float(self.samples_seen)
        stats["samples_per_s"] = generated / max(elapsed, 1e-9)
        self.check_health(stats)
        return stats

    def make_experience(self, batch: list[int]) -> tuple[Rollout, dict[str, float]]:
        raise NotImplementedError

    def update(self, rollout: Rollout) -> dict[str, float]:
        raise NotImplementedError

    # ---- pieces the algorithms share -----------------------------------------------------------------

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, float]]:
        """The reward mix's scores (minus the missing-EOS penalty) and per-source means; keeps a few samples."""
        try:
            scores, source_means = self.reward(rollout.rows, rollout.texts)
        except ConfigError as exc:  # a reward source failed or answered NaN: name the step it happened at
            raise TrainingStopped(f"step {self.step + 1}: {exc}; stopped (the last checkpoint is kept)") from None
        scores = scores.to(rollout.response_mask.device)
        if self.config.missing_eos_penalty is not None:
            scores = scores - self.config.missing_eos_penalty * (~rollout.ended).float()
        self.last_samples = [
            {"prompt": row["prompt"][-1]["content"] if row.get("prompt") else "", "response": text, "score": round(float(score), 4)}
            for row, text, score in zip(rollout.rows[:SAMPLES_KEPT], rollout.texts, scores.tolist(), strict=False)
        ]
        return scores, source_means

    def old_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, float | None]:
        """The actor's log-probs of the rollout, and how far the sampler's differ (None when not re-computed).

        A sampler on other weights (vLLM) is checked every step: a sync that failed would otherwise train on
        samples of a stale policy. The transformers sampler runs the trained module itself: its log-probs are
        checked on the first step (cache and padding paths agree) and then used as they are.
        """
        c, ac, mask = self.config, self.ac, rollout.response_mask
        if self.sampler.same_weights and self.step > 0:
            return rollout.sampler_logprobs, None
        length = rollout.response_len
        logprobs = self.chunked(rollout, ac.actor, lambda m, ids, am, p: ac.logprobs(m, ids, am, length, c.temperature, prefix=p)[0])
        mismatch = float(((logprobs - rollout.sampler_logprobs).abs() * mask).sum() / mask.sum())
        if mismatch > c.logprob_tolerance:
            raise TrainingStopped(
                f"step {self.step + 1}: rollout log-probs differ from the trainer's by {mismatch:.4f} nats/token "
                f"(> logprob_tolerance {c.logprob_tolerance}): the sampler is not running the weights being trained"
            )
        return logprobs, mismatch

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """The frozen reference's log-probs of the rollout's responses (computes the shared prefix first)."""
        ac, length = self.ac, rollout.response_len
        prefix = self.chunked(rollout, ac.actor, lambda m, ids, am, _: ac.prefix(ids, am))
        if prefix is not None:
            rollout.extras["prefix"] = prefix
        temperature = self.config.temperature
        return self.chunked(rollout, ac.reference, lambda m, ids, am, p: ac.logprobs(m, ids, am, length, temperature, prefix=p)[0])

    def chunked(self, rollout: Rollout, role: Any, forward: Any) -> Any:
        """``forward(model, ids, mask, prefix)`` over the rollout in micro-batch chunks under ``role`` (bounded memory)."""
        size = max(1, self.config.rows_per_minibatch // self.config.grad_accum)
        prefix = rollout.extras.get("prefix")
        with role() as model:
            model.eval()
            parts = [
                forward(model, rollout.input_ids[i : i + size], rollout.attention_mask[i : i + size],
                        None if prefix is None else prefix[i : i + size])
                for i in range(0, len(rollout), size)
            ]
        return None if parts[0] is None else torch.cat(parts)

    def micro_batches(self, batch: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The minibatch split in ``grad_accum`` micro-batches, each with its share of the masked tokens."""
        total = batch["response_mask"].sum()
        size = max(1, len(batch["input_ids"]) // self.config.grad_accum)
        parts = []
        for start in range(0, len(batch["input_ids"]), size):
            part = {k: v[start : start + size] for k, v in batch.items()}
            parts.append((part, float(part["response_mask"].sum() / total)))
        return parts

    # ---- health ---------------------------------------------------------------------------------------

    def check_health(self, stats: dict[str, float]) -> None:
        """Stops on a NaN/inf metric, naming the step and quantity."""
        for key, value in stats.items():
            if key in MAY_BE_NAN or key.startswith("rewards/"):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingStopped(f"step {self.step}: {key} is {value}; stopped (the last checkpoint is kept)")


def optimizer_steps(config: Any, ac: ActorCritic, dist: Distributed) -> dict[str, OptimizerStep]:
    """The actor's (and PPO's critic's) optimizers: DeepSpeed engines under a ZeRO launch, else local AdamW."""
    stage = zero_stage()
    roles = {"actor": (ac.model, ac.actor_parameters(), config.learning_rate)}
    if ac.has_critic:
        roles["critic"] = (ac.critic_module(), ac.critic_parameters(), config.critic_lr)
    if not stage:
        return {role: LocalStep(params, lr, config.max_grad_norm, dist) for role, (_, params, lr) in roles.items()}
    settings = deepspeed_config(stage, config.max_grad_norm, bool(config.bf16), dist.world)
    return {role: EngineStep(module, params, lr, settings) for role, (module, params, lr) in roles.items()}


def accumulate(stats: dict[str, float], values: dict[str, float], share: float) -> None:
    """Adds ``values`` weighted by ``share`` into ``stats`` (micro-batch means to a minibatch mean)."""
    for key, value in values.items():
        stats[key] = stats.get(key, 0.0) + value * share


def peak_memory_mb() -> float:
    """Peak CUDA memory on a GPU, else this process's peak RSS, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
