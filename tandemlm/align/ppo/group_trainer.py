"""The critic-free loop (GRPO, DAPO, GSPO, DCPO): a group of responses per prompt, no critic.

One step (``batch_size`` completions per process, ``num_generations`` per prompt):

1. **rollout** -- each prompt is sampled ``num_generations`` times; the reward mix scores every
   response (plus DAPO's overlong shaping). With ``dynamic_sampling`` a group whose rewards are all
   equal is dropped and more prompts are drawn, at most ``max_sampling_tries`` rounds; a batch still
   short is filled with dropped groups (their advantage is 0: they add only the KL term), so every
   process steps the same number of times.
2. **advantages** -- one per response, from its group (``maths.group_advantages``) or, for DCPO, also
   from the prompt's earlier visits (``maths.smooth_advantages``; the per-prompt statistics are
   part of the checkpoint, so a resumed run continues them exactly).
3. **update** -- ``num_iterations`` passes over the rollout in minibatches of whole groups: the
   algorithm's policy loss (token clip, decoupled clip, sequence ratio, dynamic clip) with its
   aggregation, plus ``beta`` times the k3 KL to the reference aggregated the same way.

Every step logs the reward, KL to the reference, entropy, length, ``response_utilization`` (share of
responses with a non-zero advantage), ``clipfrac``, groups dropped and re-sampled, samples/s and peak
memory.
"""

from __future__ import annotations

from typing import Any

import torch

from tandemlm.align.ppo import maths
from tandemlm.align.ppo.group_config import GroupRunConfig
from tandemlm.align.ppo.rl_trainer import RLTrainer, accumulate
from tandemlm.align.ppo.rollout import Rollout, concat_rollouts

NONZERO = 1e-6  # an advantage smaller than this moves nothing: the response is not "utilised"


class GroupTrainer(RLTrainer):
    """Runs steps of one critic-free algorithm; the caller owns the run folder, checkpoints and final save."""

    config: GroupRunConfig

    def __init__(self, config: GroupRunConfig, *args: Any) -> None:
        super().__init__(config, *args)
        self.prompt_stats: dict[int, tuple[float, float, int]] = {}  # DCPO: prompt -> (mean, std, visits)

    def load_training_state(self, training: dict[str, Any], state: dict[str, Any]) -> None:
        super().load_training_state(training, state)
        self.prompt_stats = {int(k): (float(m), float(s), int(n)) for k, (m, s, n) in state.get("prompt_stats", {}).items()}

    def progress_state(self) -> dict[str, Any]:
        stats = {str(k): list(v) for k, v in sorted(self.prompt_stats.items())}
        return {**super().progress_state(), "prompt_stats": stats}

    # ---- experience ---------------------------------------------------------------------------------

    @torch.no_grad()
    def make_experience(self, batch: list[int]) -> tuple[Rollout, dict[str, float]]:
        """Samples and scores groups, then the reference's and the actor's log-probs and the advantages."""
        rollout, scores, prompts, stats = self.sample_groups(batch)
        mask = rollout.response_mask
        ref_logprobs = self.reference_logprobs(rollout)
        logprobs, mismatch = self.old_logprobs(rollout)
        advantages = self.advantages(prompts, scores)
        rollout.extras.update(logprobs=logprobs, ref_logprobs=ref_logprobs, advantages=advantages)
        kl = maths.kl_penalty(logprobs, ref_logprobs, "k1")
        lengths = mask.sum(-1)
        stats.update({
            "kl": maths.masked_mean(kl, mask).item(),
            "kl_k3": maths.masked_mean(maths.kl_penalty(logprobs, ref_logprobs, "k3"), mask).item(),
            "kl_per_response": (torch.where(mask > 0, kl, 0.0)).sum(-1).mean().item(),
            "completions/mean_length": lengths.mean().item(), "eos_rate": rollout.ended.float().mean().item(),
            "response_utilization": (advantages.abs() > NONZERO).float().mean().item(),
            "advantage_abs_mean": advantages.abs().mean().item(), "beta": self.config.beta,
            "_generated_tokens": lengths.sum().item(),
        })
        if mismatch is not None:
            stats["rollout_logprob_diff"] = mismatch
        return rollout, stats

    def sample_groups(self, batch: list[int]) -> tuple[Rollout, torch.Tensor, list[int], dict[str, float]]:
        """The step's groups (rollout, shaped scores, each group's prompt index) and the sampling metrics."""
        c, size = self.config, self.config.num_generations
        want = len(batch)
        kept: list[tuple[Rollout, torch.Tensor, int]] = []
        dropped: list[tuple[Rollout, torch.Tensor, int]] = []
        every_score: list[torch.Tensor] = []
        source_sums: dict[str, float] = {}
        rounds = 0
        while True:
            rounds += 1
            rollout = self.sampler(self.ac, [self.rows[i] for i in batch for _ in range(size)],
                                   [self.prompt_ids[i] for i in batch for _ in range(size)])
            scores, source_means = self.score(rollout)
            scores = self.shape(scores, rollout)
            every_score.append(scores)
            accumulate(source_sums, source_means, float(len(rollout)))
            keep = maths.nonzero_groups(scores, size) if c.dynamic_sampling else torch.ones(want, dtype=torch.bool)
            for group, prompt in enumerate(batch):
                rows = list(range(group * size, (group + 1) * size))
                (kept if keep[group] else dropped).append((rollout.subset(rows), scores[rows], prompt))
            if not (c.dynamic_sampling and rounds < c.max_sampling_tries and self.dist.any(len(kept) < want)):
                break
            batch = self.next_batch()
        groups = kept[:want] + dropped[: max(0, want - len(kept))]
        generated = torch.cat(every_score)
        stats = {
            "score": generated.mean().item(), "reward": generated.mean().item(),
            **{k: v / len(generated) for k, v in source_sums.items()},
            "groups_dropped": float(len(dropped)), "groups_resampled": float((rounds - 1) * c.prompts_per_step),
            "sampling_rounds": float(rounds), "groups_filled_with_dropped": float(max(0, want - len(kept))),
            "_generated_samples": float(len(generated)),
        }
        rollout = concat_rollouts([g[0] for g in groups], self.tokenizer.pad_token_id)
        return rollout, torch.cat([g[1] for g in groups]), [g[2] for g in groups], stats

    def shape(self, scores: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """Scores clipped to ``reward_clip`` plus DAPO's overlong penalty, when on."""
        c = self.config
        if c.reward_clip:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        if c.overlong_tokens:
            lengths = rollout.response_mask.sum(-1)
            scores = scores + c.overlong_penalty * maths.overlong_penalty(lengths, c.max_completion_length, c.overlong_tokens)
        return scores

    def advantages(self, prompts: list[int], scores: torch.Tensor) -> torch.Tensor:
        """[rows] advantages: within each group, or (DCPO) smoothed over the prompt's visits so far."""
        c, size = self.config, self.config.num_generations
        if c.advantage == "group":
            return maths.group_advantages(scores, size, scale=c.advantage_scale)
        previous = [self.prompt_stats.get(p, (0.0, 0.0, 0)) for p in prompts]
        old_mean, old_std, old_count = (torch.tensor([s[i] for s in previous], dtype=torch.float64) for i in range(3))
        advantages, mean, std = maths.smooth_advantages(scores.double(), size, old_mean, old_std, old_count)
        updates = {p: (float(m), float(s), int(n) + 1) for p, m, s, n in zip(prompts, mean, std, old_count, strict=True)}
        for found in self.dist.gather(updates):  # a prompt may come back on another process
            self.prompt_stats.update(found)
        return advantages.to(scores.dtype)

    # ---- the update ---------------------------------------------------------------------------------

    def update(self, rollout: Rollout) -> dict[str, float]:
        """``num_iterations`` passes over the rollout in minibatches of whole groups."""
        c, size = self.config, self.config.num_generations
        sums: dict[str, float] = {}
        count = 0
        for _ in range(c.num_iterations):
            for groups in torch.randperm(len(rollout) // size).split(c.rows_per_minibatch // size):
                index = (groups[:, None] * size + torch.arange(size)).flatten()
                for key, value in self._actor_step(rollout.take(index)).items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        return {k: v / count for k, v in sums.items()}

    def _actor_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        c, ac = self.config, self.ac
        optimizer = self.optimizers["actor"]
        stats: dict[str, float] = {}
        rows = len(batch["input_ids"])
        with ac.actor() as model:
            model.train()
            for part, token_share in self.micro_batches(batch):
                mask = part["response_mask"]
                # Each micro-batch's loss is its own aggregate; its share makes their sum the minibatch's.
                share = token_share if self.aggregation == "token-mean" else len(part["input_ids"]) / rows
                logprobs, entropy = ac.logprobs(
                    model, part["input_ids"], part["attention_mask"], mask.shape[1], c.temperature,
                    with_entropy=True, entropy_grad=c.entropy_coef != 0, prefix=part.get("prefix"),
                )
                loss, values = self.policy_loss(logprobs, part)
                mean_entropy = maths.masked_mean(entropy, mask)
                total = loss - c.entropy_coef * mean_entropy
                if c.beta:
                    kl = maths.kl_penalty(logprobs, part["ref_logprobs"], "k3")
                    kl_loss = maths.aggregate_tokens(kl, mask, self.aggregation, c.num_generations)
                    total = total + c.beta * kl_loss
                    values["kl_loss"] = kl_loss.item()
                optimizer.backward(total * share)
                accumulate(stats, {"policy_loss": loss.item(), "entropy": mean_entropy.item(), **values}, share)
        stats["actor_grad_norm"] = optimizer.step()
        return stats

    @property
    def aggregation(self) -> str:
        """How token losses become one number: the sequence losses are means over responses."""
        c = self.config
        return "seq-mean-token-mean" if c.policy_loss.startswith("sequence") else c.loss_aggregation

    def policy_loss(self, logprobs: torch.Tensor, part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The algorithm's policy loss on one micro-batch, and its statistics."""
        c, mask, old = self.config, part["response_mask"], part["logprobs"]
        advantages = part["advantages"]
        if c.policy_loss.startswith("sequence"):
            return maths.sequence_policy_loss(
                logprobs, old, advantages, mask, c.cliprange, c.upper_clip, token_level=c.policy_loss == "sequence-token",
            )
        bounds = maths.dynamic_clip_bounds(old.exp(), c.cliprange, c.upper_clip) if c.policy_loss == "dynamic-clip" else None
        return maths.policy_loss(
            logprobs, old, advantages, mask, c.cliprange, clip_high=c.upper_clip, aggregate=c.loss_aggregation,
            bounds=bounds, group_size=c.num_generations,
        )
