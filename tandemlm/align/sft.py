"""``tandem align sft``: supervised fine-tuning with TRL's ``SFTTrainer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tandemlm.align.config import AlignConfig, help_field
from tandemlm.align.prepare import prepare
from tandemlm.align.run import Method, Run, train, trainer_args


@dataclass
class SFTRunConfig(AlignConfig):
    """Supervised fine-tuning on conversations (``messages``) or prompt/completion pairs."""

    method: ClassVar[str] = "sft"
    learning_rate: float = help_field(2e-5, "Peak learning rate.")
    completion_only_loss: bool = help_field(True, "Prompt/completion data: train only on the completion tokens.")
    packing: bool = help_field(False, "Pack several short examples into each max_length row.")


def run_sft(config: SFTRunConfig) -> Run:
    """Fine-tunes ``config.model`` on ``config.dataset`` and saves the run (see run_folder.py for the layout)."""
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


METHOD = Method(SFTRunConfig, run_sft, "Supervised fine-tuning on conversations or prompt/completion pairs.")
