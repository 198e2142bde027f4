"""``tandem align reward``: a Bradley-Terry reward model with TRL's ``RewardTrainer``.

The model is the base with a fresh scalar head (``AutoModelForSequenceClassification``, one label);
the loss is ``-log sigmoid(r(chosen) - r(rejected))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tandemlm.align.config import AlignConfig, help_field
from tandemlm.align.prepare import prepare
from tandemlm.align.run import Method, Run, train, trainer_args


@dataclass
class RewardRunConfig(AlignConfig):
    """A Bradley-Terry reward model (a scalar head on the base) from chosen/rejected pairs."""

    method: ClassVar[str] = "reward"
    learning_rate: float = help_field(1e-4, "Peak learning rate.")
    center_rewards_coefficient: float | None = help_field(None, "Pulls mean reward toward 0 (1e-2 is typical; unset = off).")


def run_reward(config: RewardRunConfig) -> Run:
    """Trains a reward model on ``config.dataset`` (preference pairs) and saves the run."""
    from trl import RewardConfig, RewardTrainer

    p = prepare(config, head="score")
    args = trainer_args(
        RewardConfig, p.run, p.eval is not None,
        max_length=p.config.max_length, center_rewards_coefficient=p.config.center_rewards_coefficient,
    )
    trainer = RewardTrainer(
        model=p.model, args=args, train_dataset=p.train, eval_dataset=p.eval, processing_class=p.tokenizer,
        peft_config=p.peft_config,
    )
    return train(trainer, p.run)


METHOD = Method(RewardRunConfig, run_reward, "Bradley-Terry reward model from chosen/rejected pairs.")
