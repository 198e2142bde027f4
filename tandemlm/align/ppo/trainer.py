"""The PPO loop: roll out, score, shape rewards, estimate advantages, update actor and critic.

One step (``batch_size`` prompts per process):

1. **rollout** -- the actor samples one response per prompt (``rollout.sample``); no-grad passes give
   the actor's log-probs (checked against the sampler's), the reference's, and the critic's values;
   the reward mix scores each response.
2. **shaping** -- ``r_t = -beta * KL_t`` on response tokens plus the clipped score on the last one
   (``maths.kl_rewards``); ``maths.gae`` gives advantages and returns; advantages are whitened.
3. **update** -- ``ppo_epochs`` passes in minibatches: the clipped surrogate (plus entropy bonus)
   steps the actor's optimizer, the clipped value loss the critic's, each with its own gradient
   clip and learning rate; the first ``critic_warmup_steps`` steps train the critic only.
4. **bookkeeping** -- the KL controller sees the step's KL; metrics go to metrics.jsonl; a NaN or an
   exploding value loss stops the run naming the step and the quantity (the last checkpoint stays).

Under ``accelerate launch`` every process rolls out its own prompts and gradients are averaged
across processes before each optimizer step, so all ranks keep the same weights; with a DeepSpeed
ZeRO config the actor and the critic each step in an engine of their own (``optim.py``).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import torch

from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo import maths
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

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world


class PPOTrainer:
    """Runs PPO steps over prompt rows; the caller owns the run folder, checkpoints and final save."""

    def __init__(
        self, config: Any, ac: ActorCritic, tokenizer: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]],
        reward: RewardMix, dist: Distributed, total_steps: int, sampler: Sampler,
    ) -> None:
        from transformers import get_scheduler

        self.config, self.ac, self.tokenizer, self.reward, self.dist = config, ac, tokenizer, reward, dist
        self.rows, self.prompt_ids, self.sampler = rows, prompt_ids, sampler
        self.actor_opt, self.critic_opt = optimizer_steps(config, ac, dist)
        self.actor_sched = get_scheduler(config.lr_scheduler, self.actor_opt.optimizer, config.warmup_steps, total_steps)
        self.critic_sched = get_scheduler(config.lr_scheduler, self.critic_opt.optimizer, config.warmup_steps, total_steps)
        self.kl_ctl: Any = (
            maths.AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)
            if config.adaptive_kl else maths.FixedKLController(config.beta)
        )
        self.cursor = Cursor()
        self.step = 0
        self.last_samples: list[dict[str, Any]] = []  # a few (prompt, response, score) of the last rollout

    # ---- state for checkpoints ----------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        return {
            "sharded": isinstance(self.actor_opt, EngineStep),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "actor_sched": self.actor_sched.state_dict(), "critic_sched": self.critic_sched.state_dict(),
        }

    def load_training_state(self, training: dict[str, Any], state: dict[str, Any]) -> None:
        self.actor_opt.load_state_dict(training["actor_opt"])
        self.critic_opt.load_state_dict(training["critic_opt"])
        self.actor_sched.load_state_dict(training["actor_sched"])
        self.critic_sched.load_state_dict(training["critic_sched"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.cursor = Cursor(**state["cursor"])
        self.step = int(state["global_step"])

    def progress_state(self) -> dict[str, Any]:
        return {"cursor": vars(self.cursor), "kl_controller": self.kl_ctl.state_dict()}

    # ---- data ---------------------------------------------------------------------------------------

    def next_batch(self) -> list[int]:
        """This process's row indices for the next step; a new epoch starts when one runs out."""
        need = self.config.batch_size * self.dist.world
        if self.cursor.index + need > len(self.rows):
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.config.seed + self.cursor.epoch))
        start = self.cursor.index + self.dist.rank * self.config.batch_size
        self.cursor.index += need
        return order[start : start + self.config.batch_size].tolist()

    # ---- one step -----------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One PPO step; returns its metrics."""
        started = time.monotonic()
        batch = self.next_batch()
        rollout, stats = self.make_experience(batch)
        rolled = time.monotonic()
        stats.update(self.update(rollout))
        self.step += 1
        self.sampler.sync(self.ac, self.step)
        self.actor_sched.step()
        self.critic_sched.step()
        stats.update(rollout_s=rolled - started, update_s=time.monotonic() - rolled, peak_memory_mb=peak_memory_mb())
        stats["tokens_per_s"] = stats.pop("_generated_tokens") / max(stats["rollout_s"], 1e-9)
        self.check_health(stats)
        return stats

    @torch.no_grad()
    def make_experience(self, batch: list[int]) -> tuple[Rollout, dict[str, float]]:
        """Samples, scores and shapes one rollout; its tensors land in ``rollout.extras``."""
        c, ac = self.config, self.ac
        rollout = self.sampler(ac, [self.rows[i] for i in batch], [self.prompt_ids[i] for i in batch])
        mask, length = rollout.response_mask, rollout.response_len
        prefix = self._chunked(rollout, ac.actor, lambda m, ids, am, _: ac.prefix(ids, am))
        if prefix is not None:
            rollout.extras["prefix"] = prefix
        ref_logprobs = self._chunked(rollout, ac.reference, lambda m, ids, am, p: ac.logprobs(m, ids, am, length, c.temperature, prefix=p)[0])
        values = self._chunked(rollout, ac.critic, lambda m, ids, am, p: ac.values(m, ids, am, length, prefix=p))
        logprobs, mismatch = self._old_logprobs(rollout)
        try:
            scores, source_means = self.reward(rollout.rows, rollout.texts)
        except ConfigError as exc:  # a reward source failed or answered NaN: name the step it happened at
            raise TrainingStopped(f"step {self.step + 1}: {exc}; stopped (the last checkpoint is kept)") from None
        scores = scores.to(mask.device)
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~rollout.ended).float()
        self.last_samples = [
            {"prompt": row["prompt"][-1]["content"] if row.get("prompt") else "", "response": text, "score": round(float(score), 4)}
            for row, text, score in zip(rollout.rows[:SAMPLES_KEPT], rollout.texts, scores.tolist(), strict=False)
        ]
        rewards, kl, non_score = maths.kl_rewards(
            logprobs, ref_logprobs, scores, mask, self.kl_ctl.value, c.reward_clip or None, c.kl_estimator
        )
        advantages, returns = maths.gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = maths.masked_whiten(advantages, mask)
        rollout.extras.update(logprobs=logprobs, values=values, advantages=advantages, returns=returns)
        lengths = mask.sum(-1)
        kl_per_response = (kl * mask).sum(-1).mean().item()
        stats = {
            "score": scores.mean().item(), "reward": scores.mean().item(), **source_means,
            "kl": float((kl * mask).sum() / mask.sum()), "kl_per_response": kl_per_response,
            "non_score_reward": (non_score * mask).sum(-1).mean().item(), "beta": self.kl_ctl.value,
            "completions/mean_length": lengths.mean().item(), "eos_rate": rollout.ended.float().mean().item(),
            "_generated_tokens": lengths.sum().item(),
        }
        if mismatch is not None:
            stats["rollout_logprob_diff"] = mismatch
        self.kl_ctl.update(self.dist.mean(kl_per_response), c.batch_size * self.dist.world)
        return rollout, stats

    def _old_logprobs(self, rollout: Rollout) -> tuple[torch.Tensor, float | None]:
        """The actor's log-probs of the rollout, and how far the sampler's differ (None when not re-computed).

        A sampler on other weights (vLLM) is checked every step: a sync that failed would otherwise train on
        samples of a stale policy. The transformers sampler runs the trained module itself: its log-probs are
        checked on the first step (cache and padding paths agree) and then used as they are.
        """
        c, ac, mask = self.config, self.ac, rollout.response_mask
        if self.sampler.same_weights and self.step > 0:
            return rollout.sampler_logprobs, None
        length = rollout.response_len
        logprobs = self._chunked(rollout, ac.actor, lambda m, ids, am, p: ac.logprobs(m, ids, am, length, c.temperature, prefix=p)[0])
        mismatch = float(((logprobs - rollout.sampler_logprobs).abs() * mask).sum() / mask.sum())
        if mismatch > c.logprob_tolerance:
            raise TrainingStopped(
                f"step {self.step + 1}: rollout log-probs differ from the trainer's by {mismatch:.4f} nats/token "
                f"(> logprob_tolerance {c.logprob_tolerance}): the sampler is not running the weights being trained"
            )
        return logprobs, mismatch

    def _chunked(self, rollout: Rollout, role: Any, forward: Any) -> Any:
        """``forward(model, ids, mask, prefix)`` over the rollout in micro-batch chunks under ``role`` (bounded memory)."""
        size, prefix = max(1, self.config.minibatch_size // self.config.grad_accum), rollout.extras.get("prefix")
        with role() as model:
            model.eval()
            parts = [
                forward(model, rollout.input_ids[i : i + size], rollout.attention_mask[i : i + size],
                        None if prefix is None else prefix[i : i + size])
                for i in range(0, len(rollout), size)
            ]
        return None if parts[0] is None else torch.cat(parts)

    # ---- the update ---------------------------------------------------------------------------------

    def update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped policy and value updates over the rollout's minibatches."""
        c = self.config
        sums: dict[str, float] = {}
        count = 0
        train_actor = self.step >= c.critic_warmup_steps
        for _ in range(c.ppo_epochs):
            for index in torch.randperm(len(rollout)).split(c.minibatch_size):
                batch = rollout.take(index)
                stats = self._critic_step(batch)
                if train_actor:
                    stats.update(self._actor_step(batch))
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        means = {k: v / count for k, v in sums.items()}
        mask = rollout.response_mask
        means["explained_variance"] = maths.explained_variance(rollout.extras["values"], rollout.extras["returns"], mask)
        means["critic_warmup"] = float(not train_actor)
        return means

    def _micro(self, batch: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The minibatch split in ``grad_accum`` micro-batches, each with its share of the masked tokens."""
        total = batch["response_mask"].sum()
        size = max(1, len(batch["input_ids"]) // self.config.grad_accum)
        parts = []
        for start in range(0, len(batch["input_ids"]), size):
            part = {k: v[start : start + size] for k, v in batch.items()}
            parts.append((part, float(part["response_mask"].sum() / total)))
        return parts

    def _actor_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, ac = self.config, self.ac
        stats: dict[str, float] = {}
        with ac.actor() as model:
            model.train()
            for part, share in self._micro(batch):
                mask = part["response_mask"]
                logprobs, entropy = ac.logprobs(
                    model, part["input_ids"], part["attention_mask"], mask.shape[1], c.temperature,
                    with_entropy=True, entropy_grad=c.entropy_coef != 0, prefix=part.get("prefix"),
                )
                loss, pg = maths.policy_loss(logprobs, part["logprobs"], part["advantages"], mask, c.cliprange, c.dual_clip)
                mean_entropy = maths.masked_mean(entropy, mask)
                self.actor_opt.backward((loss - c.entropy_coef * mean_entropy) * share)
                _accumulate(stats, {"policy_loss": loss.item(), "entropy": mean_entropy.item(), **pg}, share)
        stats["actor_grad_norm"] = self.actor_opt.step()
        return stats

    def _critic_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, ac = self.config, self.ac
        stats: dict[str, float] = {}
        with ac.critic() as decoder:
            decoder.train()
            for part, share in self._micro(batch):
                mask = part["response_mask"]
                values = ac.values(decoder, part["input_ids"], part["attention_mask"], mask.shape[1], prefix=part.get("prefix"))
                loss, vf = maths.value_loss(values, part["values"], part["returns"], mask, c.cliprange_value or None)
                self.critic_opt.backward(loss * share)
                _accumulate(stats, {"value_loss": loss.item(), **vf}, share)
        stats["critic_grad_norm"] = self.critic_opt.step()
        return stats

    # ---- health ---------------------------------------------------------------------------------------

    def check_health(self, stats: dict[str, float]) -> None:
        """Stops on a NaN/inf metric or a value loss past ``max_value_loss``, naming the step and quantity."""
        for key, value in stats.items():
            if key in MAY_BE_NAN or key.startswith("rewards/"):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainingStopped(f"step {self.step}: {key} is {value}; stopped (the last checkpoint is kept)")
        if stats.get("value_loss", 0.0) > self.config.max_value_loss:
            raise TrainingStopped(
                f"step {self.step}: value_loss {stats['value_loss']:.4g} exceeds max_value_loss {self.config.max_value_loss:g} "
                "(exploding critic; lower critic_learning_rate or reward_clip); stopped, the last checkpoint is kept"
            )


def optimizer_steps(config: Any, ac: ActorCritic, dist: Distributed) -> tuple[OptimizerStep, OptimizerStep]:
    """The actor's and the critic's optimizers: DeepSpeed engines under a ZeRO launch, else local AdamW."""
    stage = zero_stage()
    if not stage:
        return (
            LocalStep(ac.actor_parameters(), config.learning_rate, config.max_grad_norm, dist),
            LocalStep(ac.critic_parameters(), config.critic_lr, config.max_grad_norm, dist),
        )
    settings = deepspeed_config(stage, config.max_grad_norm, bool(config.bf16), dist.world)
    return (
        EngineStep(ac.model, ac.actor_parameters(), config.learning_rate, settings),
        EngineStep(ac.critic_module(), ac.critic_parameters(), config.critic_lr, settings),
    )


def _accumulate(stats: dict[str, float], values: dict[str, float], share: float) -> None:
    for key, value in values.items():
        stats[key] = stats.get(key, 0.0) + value * share


def peak_memory_mb() -> float:
    """Peak CUDA memory on a GPU, else this process's peak RSS, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
