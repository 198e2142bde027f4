"""``tandem align kto``: Kahneman-Tversky optimisation with TRL's ``KTOTrainer``.

Reads thumbs-up/down rows (``prompt``, ``completion``, ``label``) or preference pairs, which are
split into one desirable and one undesirable row each. The reference works as in DPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tandemlm.align.config import AlignConfig, help_field
from tandemlm.align.errors import ConfigError
from tandemlm.align.prepare import prepare
from tandemlm.align.run import Method, Run, train, trainer_args


@dataclass
class KTORunConfig(AlignConfig):
    """Kahneman-Tversky optimisation from thumbs-up/down examples (pairs are split into both)."""

    method: ClassVar[str] = "kto"
    learning_rate: float = help_field(5e-6, "Peak learning rate.")
    beta: float = help_field(0.1, "Strength of the pull toward the reference.")
    desirable_weight: float = help_field(1.0, "Loss weight of desirable (chosen) examples.")
    undesirable_weight: float = help_field(1.0, "Loss weight of undesirable (rejected) examples.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


def run_kto(config: KTORunConfig) -> Run:
    """Trains ``config.model`` with KTO on ``config.dataset`` and saves the run."""
    from trl import KTOConfig, KTOTrainer

    p = prepare(config)
    c = p.config
    args = trainer_args(
        KTOConfig, p.run, p.eval is not None,
        beta=c.beta, desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight, max_length=c.max_length,
    )
    trainer = KTOTrainer(
        model=p.model, ref_model=None, args=args, train_dataset=p.train, eval_dataset=p.eval,
        processing_class=p.tokenizer, peft_config=p.peft_config,
    )
    return train(trainer, p.run)


METHOD = Method(KTORunConfig, run_kto, "Kahneman-Tversky optimisation from desirable/undesirable examples.")
