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

What every algorithm shares (data order, optimizers, log-prob checks, state) is in ``rl_trainer``.
"""

from __future__ import annotations

from typing import Any

import torch

from tandemlm.align.ppo import maths
from tandemlm.align.ppo.config import PPORunConfig
from tandemlm.align.ppo.rl_trainer import (
    MAY_BE_NAN,
    SAMPLES_KEPT,
    Cursor,
    Distributed,
    RLTrainer,
    TrainingStopped,
    accumulate,
    optimizer_steps,
    peak_memory_mb,
)
from tandemlm.align.ppo.rollout import Rollout

__all__ = [
    "MAY_BE_NAN", "SAMPLES_KEPT", "Cursor", "Distributed", "PPOTrainer", "TrainingStopped", "optimizer_steps",
    "peak_memory_mb",
]


class PPOTrainer(RLTrainer):
    """Runs PPO steps over prompt rows; the caller owns the run folder, checkpoints and final save."""

    config: PPORunConfig

    def __init__(self, config: PPORunConfig, *args: Any) -> None:
        super().__init__(config, *args)
        self.kl_ctl: maths.FixedKLController | maths.AdaptiveKLController = (
            maths.AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)
            if config.adaptive_kl else maths.FixedKLController(config.beta)
        )

    @property
    def actor_opt(self) -> Any:
        return self.optimizers["actor"]

    @property
    def critic_opt(self) -> Any:
        return self.optimizers["critic"]

    def load_training_state(self, training: dict[str, Any], state: dict[str, Any]) -> None:
        super().load_training_state(training, state)
        self.kl_ctl.load_state_dict(state["kl_controller"])

    def progress_state(self) -> dict[str, Any]:
        return {**super().progress_state(), "kl_controller": self.kl_ctl.state_dict()}

    def train_step(self) -> dict[str, float]:
        """One PPO step; the KL controller sees the step's KL afterwards (it sets the next step's beta)."""
        stats = super().train_step()
        self.kl_ctl.update(self.dist.mean(stats["kl_per_response"]), self.config.batch_size * self.dist.world)
        return stats

    @torch.no_grad()
    def make_experience(self, batch: list[int]) -> tuple[Rollout, dict[str, float]]:
        """Samples, scores and shapes one rollout; its tensors land in ``rollout.extras``."""
        c, ac = self.config, self.ac
        rollout = self.sampler(ac, [self.rows[i] for i in batch], [self.prompt_ids[i] for i in batch])
        mask, length = rollout.response_mask, rollout.response_len
        ref_logprobs = self.reference_logprobs(rollout)
        values = self.chunked(rollout, ac.critic, lambda m, ids, am, p: ac.values(m, ids, am, length, prefix=p))
        logprobs, mismatch = self.old_logprobs(rollout)
        scores, source_means = self.score(rollout)
        rewards, kl, non_score = maths.kl_rewards(
            logprobs, ref_logprobs, scores, mask, self.kl_ctl.value, c.reward_clip or None, c.kl_estimator
        )
        advantages, returns = maths.gae(rewards, values, mask, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = maths.masked_whiten(advantages, mask)
        rollout.extras.update(logprobs=logprobs, values=values, advantages=advantages, returns=returns)
        lengths = mask.sum(-1)
        stats = {
            "score": scores.mean().item(), "reward": scores.mean().item(), **source_means,
            "kl": float((kl * mask).sum() / mask.sum()), "kl_per_response": (kl * mask).sum(-1).mean().item(),
            "non_score_reward": (non_score * mask).sum(-1).mean().item(), "beta": self.kl_ctl.value,
            "completions/mean_length": lengths.mean().item(), "eos_rate": rollout.ended.float().mean().item(),
            "_generated_tokens": lengths.sum().item(),
        }
        if mismatch is not None:
            stats["rollout_logprob_diff"] = mismatch
        return rollout, stats

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

    def _actor_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, ac = self.config, self.ac
        stats: dict[str, float] = {}
        with ac.actor() as model:
            model.train()
            for part, share in self.micro_batches(batch):
                mask = part["response_mask"]
                logprobs, entropy = ac.logprobs(
                    model, part["input_ids"], part["attention_mask"], mask.shape[1], c.temperature,
                    with_entropy=True, entropy_grad=c.entropy_coef != 0, prefix=part.get("prefix"),
                )
                loss, pg = maths.policy_loss(logprobs, part["logprobs"], part["advantages"], mask, c.cliprange, c.dual_clip)
                mean_entropy = maths.masked_mean(entropy, mask)
                self.actor_opt.backward((loss - c.entropy_coef * mean_entropy) * share)
                accumulate(stats, {"policy_loss": loss.item(), "entropy": mean_entropy.item(), **pg}, share)
        stats["actor_grad_norm"] = self.actor_opt.step()
        return stats

    def _critic_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, ac = self.config, self.ac
        stats: dict[str, float] = {}
        with ac.critic() as decoder:
            decoder.train()
            for part, share in self.micro_batches(batch):
                mask = part["response_mask"]
                values = ac.values(decoder, part["input_ids"], part["attention_mask"], mask.shape[1], prefix=part.get("prefix"))
                loss, vf = maths.value_loss(values, part["values"], part["returns"], mask, c.cliprange_value or None)
                self.critic_opt.backward(loss * share)
                accumulate(stats, {"value_loss": loss.item(), **vf}, share)
        stats["critic_grad_norm"] = self.critic_opt.step()
        return stats

    # ---- health ---------------------------------------------------------------------------------------

    def check_health(self, stats: dict[str, float]) -> None:
        """Stops on a NaN/inf metric or a value loss past ``max_value_loss``, naming the step and quantity."""
        super().check_health(stats)
        if stats.get("value_loss", 0.0) > self.config.max_value_loss:
            raise TrainingStopped(
                f"step {self.step}: value_loss {stats['value_loss']:.4g} exceeds max_value_loss {self.config.max_value_loss:g} "
                "(exploding critic; lower critic_learning_rate or reward_clip); stopped, the last checkpoint is kept"
            )
