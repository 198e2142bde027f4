"""``tandem align dpo``: direct preference optimisation with TRL's ``DPOTrainer``.

With LoRA the reference is the policy with its adapter disabled (TRL does this when it gets a
PEFT config and no ``ref_model``), so one GPU holds one copy of the weights. Without LoRA, TRL
loads a second, frozen copy from the base folder.
"""

from __future__ import annotations

from tandemlm.align.config import DPORunConfig
from tandemlm.align.prepare import prepare
from tandemlm.align.registry import register_method
from tandemlm.align.run import Run, train, trainer_args


@register_method(DPORunConfig, "Direct preference optimisation from chosen/rejected pairs.")
def run_dpo(config: DPORunConfig) -> Run:
    """Trains ``config.model`` with DPO on ``config.dataset`` (preference pairs) and saves the run."""
    from trl import DPOConfig, DPOTrainer

    p = prepare(config)
    c = p.config
    args = trainer_args(
        DPOConfig, p.run, p.eval is not None,
        beta=c.beta, loss_type=c.loss_types, loss_weights=c.loss_weight_list, max_length=c.max_length,
        precompute_ref_log_probs=c.precompute_ref_log_probs,
    )
    trainer = DPOTrainer(
        model=p.model, ref_model=None, args=args, train_dataset=p.train, eval_dataset=p.eval,
        processing_class=p.tokenizer, peft_config=p.peft_config,
    )
    return train(trainer, p.run)
