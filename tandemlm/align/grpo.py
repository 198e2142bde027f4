"""``tandem align grpo``: group-relative policy optimisation with TRL's ``GRPOTrainer``.

Each prompt gets ``num_generations`` sampled completions; rewards (verifier and/or reward model,
weighted, see rewards.py) are normalised within the group and above-average completions pushed
up. ``beta`` > 0 adds a KL penalty to the reference (the policy with its adapter disabled under
LoRA), which TRL logs as ``kl``.
"""

from __future__ import annotations

from tandemlm.align.config import GRPORunConfig
from tandemlm.align.prepare import prepare
from tandemlm.align.registry import register_method
from tandemlm.align.rewards import build_rewards
from tandemlm.align.run import Run, train, trainer_args


@register_method(GRPORunConfig, "Group-relative policy optimisation with verifier and/or reward-model rewards.")
def run_grpo(config: GRPORunConfig) -> Run:
    """Trains ``config.model`` with GRPO on the prompts of ``config.dataset`` and saves the run."""
    from trl import GRPOConfig, GRPOTrainer

    p = prepare(config)
    c = p.config
    funcs, weights, reward_tokenizers = build_rewards(c)
    args = trainer_args(
        GRPOConfig, p.run, p.eval is not None,
        num_generations=c.num_generations, max_completion_length=c.max_completion_length, temperature=c.temperature,
        top_k=c.top_k, beta=c.beta, num_iterations=c.num_iterations, reward_weights=weights,
        remove_unused_columns=False,  # the verifier reads the task and answer columns
    )
    trainer = GRPOTrainer(
        model=p.model, reward_funcs=funcs, args=args, train_dataset=p.train, eval_dataset=p.eval,
        processing_class=p.tokenizer, reward_processing_classes=reward_tokenizers, peft_config=p.peft_config,
    )
    return train(trainer, p.run)
