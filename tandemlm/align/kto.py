"""``tandem align kto``: Kahneman-Tversky optimisation with TRL's ``KTOTrainer``.

Reads thumbs-up/down rows (``prompt``, ``completion``, ``label``) or preference pairs, which are
split into one desirable and one undesirable row each. The reference works as in DPO.
"""

from __future__ import annotations

from tandemlm.align.config import KTORunConfig
from tandemlm.align.prepare import prepare
from tandemlm.align.registry import register_method
from tandemlm.align.run import Run, train, trainer_args


@register_method(KTORunConfig, "Kahneman-Tversky optimisation from desirable/undesirable examples.")
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
