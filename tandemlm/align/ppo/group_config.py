"""The critic-free algorithms: one config class, four named combinations of its knobs.

Each algorithm is GRPO's machinery with some knobs turned (verl's ``core_algos`` has the same shape):

=========  =====================================================================================
``grpo``   DeepSeekMath (arXiv 2402.03300): group-normalised advantage ``(r - mean) / (std + eps)``,
           symmetric clip 0.2, each response's token mean then the mean over responses, k3 KL to
           the reference inside the loss (beta 0.04).
``dapo``   DAPO (arXiv 2503.14476): clip-higher (0.2 / 0.28), dynamic sampling (groups whose rewards
           are all equal are dropped and more prompts sampled, at most ``max_sampling_tries`` rounds),
           token-level loss (mean over every token of the batch), overlong reward shaping, no KL term.
``gspo``   GSPO (arXiv 2507.18071): sequence-level ratio (exp of the mean per-token log-ratio of a
           response) clipped per sequence at the paper's 3e-4 / 4e-4, mean over responses, no KL term;
           ``policy_loss: sequence-token`` is GSPO-token.
``dcpo``   DCPO (arXiv 2509.02333): per-token clip bounds from the token's old probability (0.16 / 0.2),
           smooth advantage standardisation over a prompt's visits, the token mean per prompt's
           responses (OTM), no KL term.
=========  =====================================================================================

``batch_size`` counts completions per step per process (TRL's convention, which ``tandem align grpo``
has always used): ``batch_size / num_generations`` prompts are drawn, each sampled ``num_generations``
times. The update makes ``num_iterations`` passes over the rollout in minibatches of whole groups.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from tandemlm.align.config import help_field, one_of, positive
from tandemlm.align.errors import ConfigError
from tandemlm.align.ppo.config import RLRunConfig

ADVANTAGES = ("group", "group-smooth")
ADVANTAGE_SCALES = ("std", "none")
POLICY_LOSSES = ("token-clip", "sequence", "sequence-token", "dynamic-clip")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "group-token-mean")


@dataclass
class GroupRunConfig(RLRunConfig):
    """Critic-free policy optimisation: sample a group per prompt, reward it, push above-average answers."""

    method: typing.ClassVar[str] = ""
    learning_rate: float = help_field(1e-6, "Peak learning rate.")
    batch_size: int = help_field(8, "Completions per step per process (batch_size / num_generations prompts).")
    minibatch_size: int | None = help_field(
        None, "Completions per optimizer step in the update (whole groups; default: batch_size, one step per pass)."
    )
    num_generations: int = help_field(8, "Completions sampled per prompt (the group).")
    num_iterations: int = help_field(1, "Optimisation passes over each generated batch.")
    max_completion_length: int = help_field(256, "Most tokens per sampled completion.")
    beta: float = help_field(0.04, "Weight of the k3 KL to the reference inside the loss (0: no KL term; KL is still logged).")
    # ---- the algorithm's knobs -------------------------------------------------------------------
    advantage: str = help_field("group", "group (normalised within the group) or group-smooth (DCPO: also over the prompt's earlier visits).")
    advantage_scale: str = help_field("std", "std: (r - mean) / (std + eps); none: r - mean (Dr. GRPO).")
    policy_loss: str = help_field("token-clip", "token-clip, sequence (GSPO), sequence-token (GSPO-token) or dynamic-clip (DCPO).")
    loss_aggregation: str = help_field(
        "seq-mean-token-mean", "token-mean (every token of the batch), seq-mean-token-mean (per response, then mean) or group-token-mean (per prompt's responses, DCPO's OTM)."
    )
    clip_high: float | None = help_field(None, "Upper ratio clip epsilon (default: cliprange; DAPO's clip-higher sets it larger).")
    dynamic_sampling: bool = help_field(False, "Drop groups whose rewards are all equal and sample more prompts until the batch is full (DAPO).")
    max_sampling_tries: int = help_field(4, "Sampling rounds per step with dynamic_sampling; a batch still short is filled with dropped groups.")
    overlong_buffer: int | None = help_field(
        0, "DAPO's soft overlong penalty over the last N tokens up to max_completion_length (0 = off; null = a quarter of it)."
    )
    overlong_penalty: float = help_field(1.0, "Weight of the overlong penalty (it runs from 0 down to -1).")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "num_iterations", "max_sampling_tries")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2, got {self.num_generations}")
        if self.beta < 0:
            raise ConfigError(f"beta must be zero or more, got {self.beta}")
        for name, choices in (("advantage", ADVANTAGES), ("advantage_scale", ADVANTAGE_SCALES),
                              ("policy_loss", POLICY_LOSSES), ("loss_aggregation", LOSS_AGGREGATIONS)):
            one_of(self, name, choices)
        if self.clip_high is not None and not self.clip_high > 0:
            raise ConfigError(f"clip_high must be positive (or null), got {self.clip_high}")
        if self.overlong_buffer is not None and not 0 <= self.overlong_buffer < self.max_completion_length:
            raise ConfigError(
                f"overlong_buffer must be in [0, max_completion_length={self.max_completion_length}), got {self.overlong_buffer}"
            )
        if self.batch_size % self.num_generations:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations ({self.num_generations}): "
                f"for {self.method or 'this method'}, batch_size counts completions"
            )
        minibatch = self.rows_per_minibatch
        if minibatch % self.num_generations or self.batch_size % minibatch:
            raise ConfigError(
                f"minibatch_size ({minibatch}) must be a multiple of num_generations ({self.num_generations}) "
                f"and divide batch_size ({self.batch_size}): the update steps on whole groups"
            )
        if minibatch % self.grad_accum:
            raise ConfigError(f"minibatch_size ({minibatch}) must be a multiple of grad_accum ({self.grad_accum})")
        self._check_combinations(minibatch // self.grad_accum)

    def _check_combinations(self, micro_rows: int) -> None:
        """Knob settings that cannot be honoured together are refused, never silently changed."""
        if self.loss_aggregation == "group-token-mean" and micro_rows % self.num_generations:
            raise ConfigError(
                f"loss_aggregation: group-token-mean averages over whole groups, but minibatch_size / grad_accum "
                f"= {micro_rows} rows is not a multiple of num_generations ({self.num_generations})"
            )
        if self.policy_loss.startswith("sequence") and self.loss_aggregation != "seq-mean-token-mean":
            raise ConfigError(
                f"loss_aggregation: the {self.policy_loss} loss is a mean over responses (seq-mean-token-mean); "
                f"got {self.loss_aggregation}"
            )
        if self.advantage == "group-smooth" and self.advantage_scale != "std":
            raise ConfigError("advantage_scale: group-smooth (DCPO) standardises by the std; none is not defined for it")

    @property
    def overlong_tokens(self) -> int:
        """The overlong penalty's buffer in tokens (null: a quarter of max_completion_length, DAPO's 4k of 16k)."""
        return self.max_completion_length // 4 if self.overlong_buffer is None else self.overlong_buffer

    @property
    def upper_clip(self) -> float:
        return self.clip_high if self.clip_high is not None else self.cliprange

    @property
    def update_epochs(self) -> int:
        return self.num_iterations

    @property
    def rows_per_minibatch(self) -> int:
        return self.minibatch_size or self.batch_size

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations


@dataclass
class GRPORunConfig(GroupRunConfig):
    """GRPO (DeepSeekMath): group-normalised advantages, symmetric clip, per-response token mean, k3 KL in the loss."""

    method: typing.ClassVar[str] = "grpo"


@dataclass
class DAPORunConfig(GroupRunConfig):
    """DAPO: clip-higher, dynamic sampling, token-level loss, overlong shaping, no KL term."""

    method: typing.ClassVar[str] = "dapo"
    beta: float = help_field(0.0, "Weight of the k3 KL to the reference inside the loss (DAPO: 0; KL is still logged).")
    clip_high: float | None = help_field(0.28, "Upper ratio clip epsilon (DAPO's clip-higher: 0.28 against 0.2 below).")
    loss_aggregation: str = help_field("token-mean", "token-mean (DAPO), seq-mean-token-mean or group-token-mean.")
    dynamic_sampling: bool = help_field(True, "Drop groups whose rewards are all equal and sample more prompts until the batch is full.")
    overlong_buffer: int | None = help_field(
        None, "Soft overlong penalty over the last N tokens up to max_completion_length (0 = off; null = a quarter, as DAPO's 4k of 16k)."
    )


@dataclass
class GSPORunConfig(GroupRunConfig):
    """GSPO: one importance ratio per sequence, clipped per sequence, mean over responses, no KL term."""

    method: typing.ClassVar[str] = "gspo"
    beta: float = help_field(0.0, "Weight of the k3 KL to the reference inside the loss (GSPO: 0; KL is still logged).")
    policy_loss: str = help_field("sequence", "sequence (GSPO) or sequence-token (GSPO-token); the token modes also work.")
    cliprange: float = help_field(3e-4, "Lower clip of the sequence ratio (GSPO's paper: 3e-4).")
    clip_high: float | None = help_field(4e-4, "Upper clip of the sequence ratio (GSPO's paper: 4e-4).")


@dataclass
class DCPORunConfig(GroupRunConfig):
    """DCPO: dynamic per-token clip bounds, smooth advantage standardisation, token mean per prompt (OTM)."""

    method: typing.ClassVar[str] = "dcpo"
    beta: float = help_field(0.0, "Weight of the k3 KL to the reference inside the loss (DCPO: 0; KL is still logged).")
    advantage: str = help_field("group-smooth", "group-smooth (DCPO) or group.")
    policy_loss: str = help_field("dynamic-clip", "dynamic-clip (DCPO: bounds from each token's old probability) or the others.")
    loss_aggregation: str = help_field("group-token-mean", "group-token-mean (DCPO's OTM), token-mean or seq-mean-token-mean.")
    cliprange: float = help_field(0.16, "DCPO's epsilon_low in the dynamic bounds (its paper: 0.16).")
    clip_high: float | None = help_field(0.2, "DCPO's epsilon_high in the dynamic bounds (its paper: 0.2).")


GROUP_CONFIGS: tuple[type[GroupRunConfig], ...] = (GRPORunConfig, DAPORunConfig, GSPORunConfig, DCPORunConfig)
