"""``tandem align sft``: supervised fine-tuning with TRL's ``SFTTrainer``."""

from __future__ import annotations

from tandemlm.align.config import SFTRunConfig
from tandemlm.align.prepare import prepare
from tandemlm.align.registry import register_method
from tandemlm.align.run import Run, train, trainer_args


@register_method(SFTRunConfig, "Supervised fine-tuning on conversations or prompt/completion pairs.")
def run_sft(config: SFTRunConfig) -> Run:
    """Fine-tunes ``config.model`` on ``config.dataset`` and saves the run (see run.py for the layout)."""
    from trl import SFTConfig, SFTTrainer

    p = prepare(config)
    args = trainer_args(
        SFTConfig, p.run, p.eval is not None,
        max_length=p.config.max_length, packing=p.config.packing, completion_only_loss=p.config.completion_only_loss,
    )
    trainer = SFTTrainer(
        model=p.model, args=args, train_dataset=p.train, eval_dataset=p.eval, processing_class=p.tokenizer,
        peft_config=p.peft_config,
    )
    return train(trainer, p.run)
