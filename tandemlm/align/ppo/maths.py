"""The maths of RL on language models, one formula per function, on [batch, response_tokens] tensors.

``mask`` is 1.0 on real response tokens and 0.0 on padding, which may sit on either side of a row; rows may
have different lengths. Masked-out positions never influence a result (their values may be anything finite
or not), and per-token outputs are 0 there. PPO's losses average over all masked tokens of the batch:
``sum(x * mask) / sum(mask)``; ``policy_loss`` offers the other aggregations of :func:`aggregate_tokens`.
The critic-free family (GRPO, DAPO, GSPO, DCPO) lives in :mod:`tandemlm.align.ppo.group_maths` and is
re-exported here under the same names.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tandemlm.align.ppo.group_maths import (
    ADVANTAGE_SCALES,
    AGGREGATES,
    _per_token,
    _real,
    aggregate_tokens,
    cumulative_reward_stats,
    dynamic_clip_bounds,
    group_advantages,
    nonzero_groups,
    overlong_penalty,
    sequence_policy_loss,
    smooth_advantages,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATES",
    "DEFAULT_BETA",
    "DEFAULT_CLIP",
    "DEFAULT_GAMMA",
    "DEFAULT_LAM",
    "DEFAULT_REWARD_CLIP",
    "DEFAULT_VALUE_CLIP",
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_tokens",
    "cumulative_reward_stats",
    "dynamic_clip_bounds",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kl_rewards",
    "last_token_index",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "nonzero_groups",
    "overlong_penalty",
    "policy_loss",
    "sequence_policy_loss",
    "smooth_advantages",
    "value_loss",
]

DEFAULT_GAMMA = 1.0
DEFAULT_LAM = 0.95
DEFAULT_CLIP = 0.2
DEFAULT_VALUE_CLIP = 0.2
DEFAULT_REWARD_CLIP = 5.0
DEFAULT_BETA = 0.05
KL_KINDS = ("k1", "k3")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all entries when None); nan where the mask is empty."""
    real = _real(mask)
    total = torch.where(real, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / real.sum()
    return total.sum(dim) / real.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries: ``mean((x - mean(x))^2)``, times ``n / (n - 1)`` when ``unbiased``."""
    n = int(_real(mask).sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs {'2' if unbiased else '1'} or more real tokens, got {n}")
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with the (unbiased) statistics of the masked entries of the whole batch.

    With ``shift_mean=False`` the mean is added back (only the scale changes). Masked-out outputs are 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_real(mask), whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled by the policy.

    ``k1 = logp - ref_logp`` (unbiased, can be negative); ``k3 = exp(d) - 1 - d`` with ``d = ref_logp - logp``
    (Schulman's low-variance estimator, always >= 0).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k3":
        d = ref_logprobs - logprobs
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL kind {kind!r}; known kinds: {', '.join(KL_KINDS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """LongTensor [batch]: the position of each row's last real token (left- or right-padded rows alike)."""
    real = _real(mask)
    if not bool(real.any(dim=1).all()):
        rows = (~real.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no real response token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(real)
    return torch.where(real, positions, -1).max(dim=1).values


@torch.no_grad()
def kl_rewards(
    logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor, beta: float, clip: float | None,
    kind: str = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards ``r_t = -beta * KL_t``, plus ``clip(score, -clip, clip)`` on each row's last real token.

    ``scores`` is [batch]; ``clip=None`` leaves scores as they are. Returns ``(rewards, kl, non_score_reward)``,
    all [batch, T], 0 on padding, ``non_score_reward = -beta * kl``. Targets: computed without gradient.
    """
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [batch]={tuple(mask.shape[:1])}, got {tuple(scores.shape)}")
    real = _real(mask)
    kl = torch.where(real, kl_penalty(logprobs, ref_logprobs, kind), torch.zeros_like(logprobs))
    non_score_reward = -beta * kl
    scores = scores.to(non_score_reward.dtype)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    score_at_end = torch.zeros_like(non_score_reward).scatter(1, last_token_index(mask)[:, None], scores[:, None])
    return non_score_reward + score_at_end, kl, non_score_reward


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, backwards over each row's real tokens.

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``, where "next" is the
    next *real* token of the row (padding anywhere is jumped over) and ``V = A = 0`` after the last real token.
    ``returns = A + V``. Returns ``(advantages, returns)``, 0 on padding. Targets: computed without gradient.
    """
    real = _real(mask)
    zero = torch.zeros_like(values[:, 0])
    next_value, next_adv = zero, zero
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(real[:, t], adv, next_adv)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages.append(torch.where(real[:, t], adv, zero))
    advantages_t = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(real, advantages_t + values, torch.zeros_like(values))
    return advantages_t, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float,
    dual_clip: float | None = None, clip_high: float | None = None, aggregate: str = "token-mean",
    bounds: tuple[Tensor, Tensor] | None = None, group_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate ``max(-A * ratio, -A * clip(ratio, low, high))`` per token, then aggregated.

    ``ratio = exp(logp - old_logp)``. The band is ``[1 - clip, 1 + clip_high]`` (``clip_high`` defaults to ``clip``;
    a larger one is DAPO's clip-higher, arXiv 2503.14476), or per token ``bounds = (low, high)``, tensors
    [batch, T] that replace it (DCPO, see :func:`dynamic_clip_bounds`). ``advantages`` are [batch, T], or [batch]
    for one per response (GRPO) broadcast over its tokens. With ``dual_clip = c > 1`` (Ye et al. 2020), tokens
    with ``A < 0`` are further capped at ``-c * A``. ``aggregate`` and ``group_size``: see :func:`aggregate_tokens`
    (default: masked mean over all real tokens of the batch, PPO's and DAPO's). Stats: ``clipfrac`` (share of real
    tokens where the clipped branch wins, so their gradient is 0), ``clipfrac_low``/``clipfrac_high`` (those with
    the ratio below/above the band), ``dual_clipfrac`` (share capped by the dual clip, also gradient 0),
    ``approx_kl`` (masked mean of ``0.5 * (logp - old_logp)^2``), ``approx_kl_k3`` (of ``ratio - 1 - log ratio``),
    ``ratio_mean``; all are shares or means over the real tokens of the batch, whatever ``aggregate``.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    real = _real(mask)
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)  # 0 on padding: no inf/nan even in gradients
    advantages = _per_token(advantages, real)
    ratio = torch.exp(log_ratio)
    low, high = _ratio_band(real, clip, clip_high, bounds)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(low, high)
    per_token = torch.maximum(unclipped, clipped)
    dual_capped = torch.zeros_like(real)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_capped, cap, per_token)
    loss = aggregate_tokens(per_token, mask, aggregate, group_size)
    with torch.no_grad():
        won = clipped > unclipped
        stats = {
            "clipfrac": masked_mean(won.float(), mask).item(),
            "clipfrac_low": masked_mean((won & (ratio < low)).float(), mask).item(),
            "clipfrac_high": masked_mean((won & (ratio > high)).float(), mask).item(),
            "dual_clipfrac": masked_mean(dual_capped.float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "approx_kl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def _ratio_band(
    real: Tensor, clip: float, clip_high: float | None, bounds: tuple[Tensor, Tensor] | None
) -> tuple[float | Tensor, float | Tensor]:
    """The ratio's clip band: ``(1 - clip, 1 + clip_high)``, or the per-token ``bounds``.

    Padding needs no cleaning here: its ratio is 1 and its advantage 0, and the aggregation drops it.
    """
    if bounds is None:
        return 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high)
    low, high = bounds
    if low.shape != real.shape or high.shape != real.shape:
        raise ValueError(f"bounds must be two [batch, T]={tuple(real.shape)} tensors, got {tuple(low.shape)} and {tuple(high.shape)}")
    return low, high


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None
) -> tuple[Tensor, dict[str, float]]:
    """``0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - clip, V_old + clip) - R)^2))``.

    ``clip=None``: ``0.5 * masked_mean((V - R)^2)``. Stats: ``value_clipfrac`` (share of masked tokens where the
    clipped term wins).
    """
    real = _real(mask)
    values, old_values, returns = (torch.where(real, v, 0.0) for v in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), {"value_clipfrac": 0.0}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask).item()
    return loss, {"value_clipfrac": clipfrac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """[batch, T, vocab] -> [batch, T]: ``H = logsumexp(z) - sum(softmax(z) * z)``, for finite logits."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked entries; nan when ``Var(R) = 0``."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns)


class FixedKLController:
    """A constant KL coefficient ``beta``."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        _check_kind(state, "fixed")
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: steers the KL coefficient so the measured KL approaches ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Multiplies ``value`` by ``1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        _check_kind(state, "adaptive")
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


def _check_kind(state: dict[str, float | str], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state is for a {state.get('kind')!r} KL controller, not {kind!r}")
