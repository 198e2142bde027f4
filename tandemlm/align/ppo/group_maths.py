"""The maths of the critic-free family (GRPO, Dr. GRPO, DAPO, GSPO, DCPO), one formula per function.

Same conventions as :mod:`tandemlm.align.ppo.maths`, which re-exports every public name here: per-token tensors
are [batch, response_tokens] with a ``mask`` (1.0 on real tokens, 0.0 on padding on either side, whose values
never matter); scores and sequence advantages are [batch]. A *group* is ``group_size`` consecutive rows: the
responses sampled for one prompt. This module imports nothing from ``maths`` (``maths`` imports it), so the
token aggregations live here and ``maths.policy_loss`` uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGGREGATES = ("token-mean", "seq-mean-token-mean", "group-token-mean")
ADVANTAGE_SCALES = ("std", "none")

__all__ = [
    "ADVANTAGE_SCALES",
    "AGGREGATES",
    "aggregate_tokens",
    "cumulative_reward_stats",
    "dynamic_clip_bounds",
    "group_advantages",
    "nonzero_groups",
    "overlong_penalty",
    "sequence_policy_loss",
    "smooth_advantages",
]


def _real(mask: Tensor) -> Tensor:
    """The mask as booleans: True on real tokens."""
    return mask > 0 if mask.dtype != torch.bool else mask


def _grouped(scores: Tensor, group_size: int) -> Tensor:
    """[batch] -> [batch / group_size, group_size]; a batch that does not split into whole groups is an error."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be [batch], got shape {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"batch {scores.shape[0]} is not a multiple of group_size {group_size}")
    return scores.reshape(-1, group_size)


def _group_stats(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Each group's mean and unbiased std (``torch.std``), exact for a group whose rewards are all equal.

    ``mean`` of equal floats can be off by an ulp (0.1 + 0.1 + 0.1 != 0.3), which would leave tiny non-zero
    advantages blown up by ``1 / eps``; such a group gets its own value as mean and std 0 instead.
    """
    constant = (grouped == grouped[:, :1]).all(dim=1)
    mean = torch.where(constant, grouped[:, 0], grouped.mean(dim=1))
    if grouped.shape[1] == 1:  # torch.std of one value is nan (n - 1 = 0); a lone response is its own mean
        return mean, torch.zeros_like(mean)
    return mean, torch.where(constant, torch.zeros_like(mean), grouped.std(dim=1))


def _per_token(advantages: Tensor, real: Tensor) -> Tensor:
    """Advantages [batch, T] or [batch] (one per row, broadcast over its tokens) as [batch, T], 0 on padding."""
    if advantages.shape == real.shape[:1]:
        advantages = advantages[:, None].expand(real.shape)
    elif advantages.shape != real.shape:
        raise ValueError(f"advantages must be [batch, T]={tuple(real.shape)} or [batch], got {tuple(advantages.shape)}")
    return torch.where(real, advantages, torch.zeros_like(advantages))


@torch.no_grad()
def group_advantages(scores: Tensor, group_size: int, scale: str = "std", eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantage of each response (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300).

    Scores [batch] come in consecutive groups of ``group_size``. ``scale="std"``: ``(r - mean) / (std + eps)``
    with the group's unbiased std, as ``torch.std`` (and TRL) computes it; ``"none"``: ``r - mean`` (Dr. GRPO,
    Liu et al. 2025, arXiv 2503.20783, which drops the std to avoid favouring too-easy or too-hard prompts).
    A group whose rewards are all equal gets advantages exactly 0 (even with ``eps = 0``). Returns [batch].
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; known scales: {', '.join(ADVANTAGE_SCALES)}")
    grouped = _grouped(scores, group_size)
    mean, std = _group_stats(grouped)
    if scale == "std":
        return _standardised(grouped, mean, std, eps).reshape(-1)
    return (grouped - mean[:, None]).reshape(-1)


def nonzero_groups(scores: Tensor, group_size: int) -> Tensor:
    """Bool [groups]: True where a group's rewards are not all equal (DAPO's dynamic sampling, arXiv 2503.14476).

    A group of equal rewards has advantage 0 everywhere, so it adds no gradient; DAPO keeps only the others.
    """
    grouped = _grouped(scores, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), added to the reward. [batch] float.

    With ``L`` the response length: ``0`` for ``L <= max - cache``; ``(max - cache - L) / cache`` for
    ``max - cache < L <= max`` (a ramp from 0 down to -1); ``-1`` beyond ``max``.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"cache_length must be in (0, max_length={max_length}], got {cache_length}")
    lengths = lengths.to(lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype())
    start = max_length - cache_length
    ramp = (start - lengths) / cache_length
    penalty = torch.where(lengths > max_length, torch.full_like(lengths, -1.0), ramp)
    return torch.where(lengths <= start, torch.zeros_like(lengths), penalty)


def _mean_of_unit_means(values: Tensor, real: Tensor, rows_per_unit: int) -> Tensor:
    """Token mean inside each unit of ``rows_per_unit`` consecutive rows, then the mean over units with a token."""
    if values.shape[0] % rows_per_unit:
        raise ValueError(f"batch {values.shape[0]} is not a multiple of group_size {rows_per_unit}")
    sums = values.reshape(-1, rows_per_unit * values.shape[1]).sum(dim=1)
    counts = real.reshape(-1, rows_per_unit * real.shape[1]).sum(dim=1)
    means = sums / counts.clamp(min=1)  # 0 for a unit without a real token...
    return means.sum() / (counts > 0).sum().clamp(min=1)  # ...which the mean does not count either


def aggregate_tokens(
    per_token: Tensor, mask: Tensor, aggregate: str = "token-mean", group_size: int | None = None
) -> Tensor:
    """A per-token loss [batch, T] reduced to a scalar over the real tokens; the one home of these reductions.

    - ``"token-mean"``: the mean over every real token of the batch, ``sum(x * mask) / sum(mask)`` (DAPO,
      arXiv 2503.14476: long responses weigh by their length; PPO's loss). nan for a batch without real tokens.
    - ``"seq-mean-token-mean"``: each row's mean over its real tokens, then the mean over rows (GRPO,
      arXiv 2402.03300: every response weighs the same). Rows without a real token are left out of the mean
      (TRL divides by every row instead), and a batch with none gives 0.
    - ``"group-token-mean"``: the mean over all real tokens of each group of ``group_size`` consecutive rows,
      then the mean over groups (DCPO's "only token mean", OTM, arXiv 2509.02333: responses to one prompt weigh
      by length, prompts the same). The authors' verl code sums the per-prompt token means; we average them,
      which only rescales the loss by the number of prompts: same direction, and Adam absorbs the scale.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; known aggregates: {', '.join(AGGREGATES)}")
    real = _real(mask)
    values = torch.where(real, per_token, torch.zeros_like(per_token))
    if aggregate == "token-mean":
        return values.sum() / real.sum()
    if aggregate == "seq-mean-token-mean":
        return _mean_of_unit_means(values, real, 1)
    if group_size is None or group_size < 1:
        raise ValueError(f"aggregate 'group-token-mean' needs a positive group_size, got {group_size}")
    return _mean_of_unit_means(values, real, group_size)


def sequence_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float,
    clip_high: float | None = None, token_level: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO's clipped surrogate on sequence-level importance ratios (Zheng et al. 2025, arXiv 2507.18071).

    ``s_i = exp(mean over row i's real tokens of (logp - old_logp))``: the length-normalised sequence ratio,
    whose noise does not grow with length as a product of token ratios would. With advantages [batch]:
    ``loss = mean over rows of max(-A_i * s_i, -A_i * clip(s_i, 1 - clip, 1 + clip_high))`` (``clip_high``
    defaults to ``clip``); a clipped sequence gets no gradient at all.
    ``token_level=True`` is GSPO-token: ``s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])``, equal to ``s_i`` in value
    but with each token's own gradient, so advantages may also be per token [batch, T]; the per-token terms
    are aggregated "seq-mean-token-mean" (with one advantage per row both forms give the same loss and gradient).
    Rows without a real token are left out. Stats: ``clipfrac`` (share of real tokens whose gradient the clipping
    zeroed, i.e. tokens of clipped sequences), ``clipfrac_low``/``clipfrac_high`` (those below/above the band),
    ``ratio_mean`` (mean of ``s_i`` over real tokens), ``approx_kl``/``approx_kl_k3`` (as ``policy_loss``).
    """
    real = _real(mask)
    low, high = 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high)
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))  # 0 on padding: no inf/nan
    seq_log_ratio = log_ratio.sum(dim=1) / real.sum(dim=1).clamp(min=1)
    if token_level:
        advantages = _per_token(advantages, real)
        own = torch.where(real, logprobs, torch.zeros_like(logprobs))
        weight = torch.exp(seq_log_ratio.detach()[:, None] + own - own.detach())
    else:
        if advantages.shape != real.shape[:1]:
            raise ValueError(f"sequence-level advantages must be [batch]={tuple(real.shape[:1])}, got {tuple(advantages.shape)}")
        advantages = advantages[:, None]  # a row without real tokens is dropped by the aggregation, whatever its value
        weight = torch.exp(seq_log_ratio)[:, None]  # [batch, 1]: one term per sequence, broadcast below
    unclipped = -advantages * weight
    clipped = -advantages * weight.clamp(low, high)
    per_term = torch.maximum(unclipped, clipped).expand(real.shape)
    # Each row's token mean of a per-sequence term is that term: the same code serves both levels.
    loss = aggregate_tokens(per_term, real, "seq-mean-token-mean")
    with torch.no_grad():
        won = (clipped > unclipped).expand(real.shape)
        ratio = weight.expand(real.shape)
        stats = {
            "clipfrac": aggregate_tokens(won.float(), real).item(),
            "clipfrac_low": aggregate_tokens((won & (ratio < low)).float(), real).item(),
            "clipfrac_high": aggregate_tokens((won & (ratio > high)).float(), real).item(),
            "approx_kl": aggregate_tokens(0.5 * log_ratio**2, real).item(),
            "approx_kl_k3": aggregate_tokens(torch.expm1(log_ratio) - log_ratio, real).item(),
            "ratio_mean": aggregate_tokens(ratio, real).item(),
        }
    return loss, stats


@torch.no_grad()
def dynamic_clip_bounds(
    old_probs: Tensor, eps_low: float, eps_high: float, max_high: float = 10.0
) -> tuple[Tensor, Tensor]:
    """DCPO's per-token ratio bounds from the old probability ``q`` of each token (Yang et al. 2025, arXiv 2509.02333).

    ``low = (1 + sqrt(max(1 - 4 * eps_low / q, 0))) / 2`` and ``high = min((1 + sqrt(1 + 4 * eps_high / q)) / 2,
    max_high)``, as the authors' ``get_clip_low_high`` (lime-RL/DCPO) computes them: rare tokens (small ``q``) may
    move further, which fixed bounds would clip. As ``q`` rises ``high`` falls and ``low`` rises, always
    ``low <= 1 <= high``; at ``q = 1`` they are ``(1 + sqrt(1 - 4 eps_low)) / 2`` and ``(1 + sqrt(1 + 4 eps_high)) / 2``;
    ``q = 0`` gives ``(0.5, max_high)``. Pass them to ``policy_loss(bounds=...)``; padding values do not matter.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if max_high < 1:
        raise ValueError(f"max_high must be >= 1, got {max_high}")
    q = old_probs.clamp(min=torch.finfo(old_probs.dtype).tiny)  # q = 0: eps / q is huge, not 0/0 = nan when eps = 0
    low = (1 + torch.sqrt((1 - 4 * eps_low / q).clamp(min=0))) / 2
    high = ((1 + torch.sqrt(1 + 4 * eps_high / q)) / 2).clamp(max=max_high)
    return low, high


@torch.no_grad()
def cumulative_reward_stats(
    old_mean: Tensor, old_std: Tensor, old_count: Tensor, new_mean: Tensor, new_std: Tensor
) -> tuple[Tensor, Tensor]:
    """A prompt's reward mean and std over all its visits, DCPO (arXiv 2509.02333), as the authors' ``get_mean_std``.

    ``old_*`` summarise ``n = old_count`` earlier visits, each visit weighing the same; ``new_*`` this visit's
    group. ``n = 0``: the new statistics (whatever ``old_*`` hold). Otherwise ``mean = (n * old_mean + new_mean) /
    (n + 1)`` and ``var = (n * old_std^2 + new_std^2 + n / (n + 1) * (new_mean - old_mean)^2) / (n + 1)``: the
    parallel-variance rule, which gives exactly the population std of all the scores when fed population stds
    of equal-sized visits. Fed unbiased group stds (as :func:`smooth_advantages` and the authors do) it is close
    to, but not, the unbiased std of all the scores (above or below it). All tensors [groups].
    """
    n = old_count.to(new_mean.dtype)
    mean = (n * old_mean + new_mean) / (n + 1)
    var = (n * old_std**2 + new_std**2 + n / (n + 1) * (new_mean - old_mean) ** 2) / (n + 1)
    first = old_count == 0
    return torch.where(first, new_mean, mean), torch.where(first, new_std, var.sqrt())


def _standardised(grouped: Tensor, mean: Tensor, std: Tensor, eps: float) -> Tensor:
    """``(r - mean) / (std + eps)`` per group, 0 for a group with ``std == 0`` (nothing to tell its answers apart)."""
    std = std[:, None]
    return torch.where(std > 0, (grouped - mean[:, None]) / (std + eps), torch.zeros_like(grouped))


@torch.no_grad()
def smooth_advantages(
    scores: Tensor, group_size: int, old_mean: Tensor, old_std: Tensor, old_count: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """DCPO's smooth advantage standardisation (arXiv 2509.02333, authors' ``compute_dcpo_outcome_advantage``).

    For each group (a prompt on its ``i = old_count + 1``-th visit): ``A_new`` standardises the rewards with this
    visit's mean and unbiased std, ``A_tot`` with the cumulative ones (:func:`cumulative_reward_stats`); each is 0
    where its std is 0. ``SA_1 = ((i - 1) / i) * A_new + (1 / i) * A_tot``, ``SA_2 = (1 / i) * A_new +
    ((i - 1) / i) * A_tot``, and the advantage is whichever has the smaller absolute value. So a group of equal
    rewards still gets a gradient when earlier visits of its prompt scored differently, and a first visit gives
    :func:`group_advantages`. ``old_*`` are [groups] (any values where ``old_count`` is 0). Returns
    ``(advantages [batch], mean [groups], std [groups])``: the cumulative statistics, to store with
    ``old_count + 1`` for the prompt's next visit.
    """
    grouped = _grouped(scores, group_size)
    new_mean, new_std = _group_stats(grouped)
    mean, std = cumulative_reward_stats(old_mean, old_std, old_count, new_mean, new_std)
    a_new, a_tot = _standardised(grouped, new_mean, new_std, eps), _standardised(grouped, mean, std, eps)
    visits = (old_count + 1).to(grouped.dtype)[:, None]
    sa_1 = (visits - 1) / visits * a_new + a_tot / visits
    sa_2 = a_new / visits + (visits - 1) / visits * a_tot
    return torch.where(sa_1.abs() < sa_2.abs(), sa_1, sa_2).reshape(-1), mean, std
