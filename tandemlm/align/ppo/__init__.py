"""tandemlm's own RL trainer: PPO (actor and critic) and the critic-free GRPO, DAPO, GSPO and DCPO.

One resident base serves every role. Modules, bottom up: ``maths`` (pure functions: KL-shaped
rewards, GAE, group advantages, the clipped policy losses and their aggregations, value loss,
whitening, KL controllers), ``config`` (``RLRunConfig``, ``PPORunConfig``), ``group_config`` (the
critic-free algorithms as named settings of one config), ``plan`` (memory estimate, ``--plan``),
``policy`` (actor and critic adapters, value head, reference = adapters off), ``rollout`` (batched
KV-cached sampling), ``scoring`` (verifier / reward model / HTTP mix), ``checkpoint`` (exact resume),
``rl_trainer`` (what every algorithm's loop shares), ``trainer`` (PPO's loop), ``group_trainer``
(the critic-free loop) and ``method`` (set-up, resume, final save). Importing this package loads no
torch; a method runs when called.
"""

from __future__ import annotations

from typing import Any

from tandemlm.align.ppo.config import PPORunConfig, RLRunConfig
from tandemlm.align.ppo.group_config import DAPORunConfig, DCPORunConfig, GRPORunConfig, GSPORunConfig
from tandemlm.align.run import Method, Run


def run_ppo(config: RLRunConfig) -> Run | None:
    """Trains with the config's algorithm (see :func:`tandemlm.align.ppo.method.run_ppo`); torch loads only here."""
    from tandemlm.align.ppo.method import run_ppo as run

    return run(config)


METHOD = Method(PPORunConfig, run_ppo, "RLHF with PPO: actor and critic adapters on one base, any reward mix.")
GROUP_METHODS = (
    Method(GRPORunConfig, run_ppo, "GRPO (DeepSeekMath): group-normalised advantages, no critic, k3 KL in the loss."),
    Method(DAPORunConfig, run_ppo, "DAPO: clip-higher, dynamic sampling, token-level loss, overlong shaping."),
    Method(GSPORunConfig, run_ppo, "GSPO: one clipped importance ratio per response (sequence level)."),
    Method(DCPORunConfig, run_ppo, "DCPO: per-token clip bounds from old probabilities, smooth advantages, OTM loss."),
)
__all__: list[Any] = ["GROUP_METHODS", "METHOD", "PPORunConfig", "run_ppo"]
