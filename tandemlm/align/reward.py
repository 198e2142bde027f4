"""``tandem align reward``: a Bradley-Terry reward model with TRL's ``RewardTrainer``.

The model is the base with a fresh scalar head (``AutoModelForSequenceClassification``, one label);
the loss is ``-log sigmoid(r(chosen) - r(rejected))``.
"""

from __future__ import annotations

from tandemlm.align.config import RewardRunConfig
from tandemlm.align.prepare import prepare
from tandemlm.align.registry import register_method
from tandemlm.align.run import Run, train, trainer_args


@register_method(RewardRunConfig, "Bradley-Terry reward model from chosen/rejected pairs.")
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
