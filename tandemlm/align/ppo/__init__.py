"""``tandem align ppo``: tandemlm's own RLHF-PPO trainer (TRL removed theirs), one resident base for four roles.

Modules, bottom up: ``maths`` (pure functions: KL-shaped rewards, GAE, clipped policy and value
losses, whitening, KL controllers), ``config`` (``PPORunConfig``), ``plan`` (memory estimate,
``--plan``), ``policy`` (actor and critic adapters, value head, reference = adapters off),
``rollout`` (batched KV-cached sampling), ``scoring`` (verifier / reward model / HTTP mix),
``checkpoint`` (exact resume), ``trainer`` (the loop), ``method`` (set-up, resume, final save).
Importing this package loads no torch; the method runs when called.
"""

from __future__ import annotations

from typing import Any

from tandemlm.align.ppo.config import PPORunConfig
from tandemlm.align.run import Method, Run


def run_ppo(config: PPORunConfig) -> Run | None:
    """Trains with PPO (see :func:`tandemlm.align.ppo.method.run_ppo`); torch loads only here."""
    from tandemlm.align.ppo.method import run_ppo as run

    return run(config)


METHOD = Method(PPORunConfig, run_ppo, "RLHF with PPO: actor and critic adapters on one base, any reward mix.")
__all__: list[Any] = ["METHOD", "PPORunConfig", "run_ppo"]
