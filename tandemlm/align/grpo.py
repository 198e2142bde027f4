"""``tandem align grpo``: group-relative policy optimisation with TRL's ``GRPOTrainer``.

Each prompt gets ``num_generations`` sampled completions; rewards (verifier and/or reward model,
weighted, see rewards.py) are normalised within the group and above-average completions pushed
up. ``beta`` > 0 adds a KL penalty to the reference (the policy with its adapter disabled under
LoRA), which TRL logs as ``kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tandemlm.align.config import AlignConfig, help_field, positive
from tandemlm.align.errors import ConfigError
from tandemlm.align.prepare import Prepared, prepare
from tandemlm.align.rewards import build_rewards, check_reward_model, parse_reward_spec
from tandemlm.align.run import Method, Run, train, trainer_args


@dataclass
class GRPORunConfig(AlignConfig):
    """Group-relative policy optimisation: sample a group per prompt, reward it, push above-average ones."""

    method: ClassVar[str] = "grpo"
    learning_rate: float = help_field(1e-6, "Peak learning rate.")
    batch_size: int = help_field(8, "Completions per device per step (a multiple of num_generations with grad_accum).")
    rewards: str = help_field("verifier", "Reward functions with weights: verifier, reward_model, http (e.g. verifier:1,reward_model:0.5).")
    reward_model: str | None = help_field(None, "A reward run folder (tandem align reward) for the reward_model reward.")
    reward_url: str | None = help_field(None, "HTTP endpoint for the http reward: POST {prompts, responses} -> {scores}.")
    num_generations: int = help_field(8, "Completions sampled per prompt (the group).")
    max_completion_length: int = help_field(256, "Most tokens per sampled completion.")
    temperature: float = help_field(1.0, "Sampling temperature for the group.")
    top_k: int = help_field(0, "Sample among the k likeliest tokens (0 = all).")
    beta: float = help_field(0.04, "KL penalty toward the reference (0 disables the reference and the KL metric).")
    num_iterations: int = help_field(1, "Optimisation passes over each generated batch.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2, got {self.num_generations}")
        positive(self, "max_completion_length", "num_iterations")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.beta < 0:
            raise ConfigError(f"beta must be zero or more, got {self.beta}")
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ConfigError(
                f"batch_size * grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                f"num_generations ({self.num_generations}): for grpo, batch_size counts completions"
            )
        specs = parse_reward_spec(self.rewards)  # raises ConfigError naming `rewards`
        if any(name == "reward_model" for name, _ in specs) and not self.reward_model:
            raise ConfigError("rewards uses reward_model but reward_model (a reward run folder) is not set")
        if any(name == "http" for name, _ in specs) and not self.reward_url:
            raise ConfigError("rewards uses http but reward_url is not set")

    def validate(self) -> None:
        """The shared checks, then the reward model folder (a missing one fails before the policy loads)."""
        super().validate()
        if self.reward_model:
            check_reward_model(self.reward_model)


def run_grpo(config: GRPORunConfig) -> Run:
    """Trains ``config.model`` with GRPO on the prompts of ``config.dataset`` and saves the run."""
    p = prepare(config)
    return train(grpo_trainer(p), p.run)


def grpo_trainer(p: Prepared) -> Any:
    """TRL's ``GRPOTrainer`` on a prepared run, with the config's rewards (``bench/align_gpu_memory.py`` builds it too)."""
    from trl import GRPOConfig, GRPOTrainer

    c = p.config
    funcs, weights, reward_tokenizers = build_rewards(c)
    args = trainer_args(
        GRPOConfig, p.run, p.eval is not None,
        num_generations=c.num_generations, max_completion_length=c.max_completion_length, temperature=c.temperature,
        top_k=c.top_k, beta=c.beta, num_iterations=c.num_iterations, reward_weights=weights,
        remove_unused_columns=False,  # the verifier reads the task and answer columns
    )
    return GRPOTrainer(
        model=p.model, reward_funcs=funcs, args=args, train_dataset=p.train, eval_dataset=p.eval,
        processing_class=p.tokenizer, reward_processing_classes=reward_tokenizers, peft_config=p.peft_config,
    )


METHOD = Method(GRPORunConfig, run_grpo, "Group-relative policy optimisation with verifier and/or reward-model rewards.")
