"""``tandem align dpo``: direct preference optimisation with TRL's ``DPOTrainer``.

With LoRA the reference is the policy with its adapter disabled (TRL does this when it gets a
PEFT config and no ``ref_model``), so one GPU holds one copy of the weights. Without LoRA, TRL
loads a second, frozen copy from the base folder.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from tandemlm.align.config import AlignConfig, help_field
from tandemlm.align.errors import ConfigError
from tandemlm.align.prepare import Prepared, prepare
from tandemlm.align.run import Method, Run, train, trainer_args


@dataclass
class DPORunConfig(AlignConfig):
    """Direct preference optimisation from chosen/rejected pairs against a frozen reference."""

    method: ClassVar[str] = "dpo"
    learning_rate: float = help_field(5e-6, "Peak learning rate.")
    beta: float = help_field(0.1, "Strength of the pull toward the reference (higher = stay closer).")
    loss_type: str = help_field("sigmoid", "DPO loss(es), comma list: sigmoid (the paper), ipo, hinge, sft (NLL of chosen), ...")
    loss_weights: str | None = help_field(None, "Weights of the losses in loss_type, comma list (default 1 each); sigmoid,sft = RPO.")
    precompute_ref_log_probs: bool = help_field(False, "Score the data with the reference once up front (saves memory).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not self.loss_types:
            raise ConfigError("loss_type must name at least one loss (e.g. sigmoid)")
        if self.loss_weights is not None and len(self.loss_weight_list) != len(self.loss_types):
            raise ConfigError(f"loss_weights needs one weight per loss in loss_type ({', '.join(self.loss_types)})")

    def validate(self) -> None:
        """The shared checks, then each of ``loss_type``'s names against TRL's DPO losses."""
        super().validate()
        known = dpo_loss_types()
        unknown = [name for name in self.loss_types if known and name not in known]
        if unknown:
            raise ConfigError(f"loss_type {unknown[0]!r} is not a DPO loss; known: {', '.join(known)}")

    @property
    def loss_types(self) -> list[str]:
        return [name.strip() for name in self.loss_type.split(",") if name.strip()]

    @property
    def loss_weight_list(self) -> list[float] | None:
        if self.loss_weights is None:
            return None
        try:
            return [float(w) for w in self.loss_weights.split(",")]
        except ValueError:
            raise ConfigError(f"loss_weights must be numbers separated by commas, got {self.loss_weights!r}") from None


@functools.cache
def dpo_loss_types() -> tuple[str, ...]:
    """TRL's DPO loss names, read from the help of ``DPOConfig.loss_type`` (TRL keeps no list of them).

    Empty if TRL ever words that help differently: then nothing is refused here and TRL's own
    check still names an unknown loss (after the model loads).
    """
    from trl import DPOConfig

    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    return tuple(dict.fromkeys(re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", ""))))


def run_dpo(config: DPORunConfig) -> Run:
    """Trains ``config.model`` with DPO on ``config.dataset`` (preference pairs) and saves the run."""
    p = prepare(config)
    return train(dpo_trainer(p), p.run)


def dpo_trainer(p: Prepared) -> Any:
    """TRL's ``DPOTrainer`` on a prepared run, configured from its config (``bench/align_gpu_memory.py`` builds it too)."""
    from trl import DPOConfig, DPOTrainer

    c = p.config
    args = trainer_args(
        DPOConfig, p.run, p.eval is not None,
        beta=c.beta, loss_type=c.loss_types, loss_weights=c.loss_weight_list, max_length=c.max_length,
        precompute_ref_log_probs=c.precompute_ref_log_probs,
    )
    return DPOTrainer(
        model=p.model, ref_model=None, args=args, train_dataset=p.train, eval_dataset=p.eval,
        processing_class=p.tokenizer, peft_config=p.peft_config,
    )


METHOD = Method(DPORunConfig, run_dpo, "Direct preference optimisation from chosen/rejected pairs.")
