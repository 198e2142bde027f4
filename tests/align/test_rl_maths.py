"""The critic-free family's maths (GRPO, DAPO, GSPO, DCPO) on numbers worked by hand (the working is in the
comments), float64 throughout. Padding sits on either side and holds garbage (nan, inf) that must not matter."""

from __future__ import annotations

import math

import pytest
import torch

from tandemlm.align.ppo.maths import (
    aggregate_tokens,
    cumulative_reward_stats,
    dynamic_clip_bounds,
    group_advantages,
    nonzero_groups,
    overlong_penalty,
    policy_loss,
    sequence_policy_loss,
    smooth_advantages,
)

NAN, INF = float("nan"), float("inf")
SIDES = ["left", "right"]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=atol)


def pad(row: list[float], width: int, side: str, fill: float) -> list[float]:
    filler = [fill] * (width - len(row))
    return row + filler if side == "right" else filler + row


def padded(rows: list[list[float]], width: int, side: str, fill: float) -> torch.Tensor:
    return t([pad(r, width, side, fill) for r in rows])


def mask_of(rows: list[list[float]], width: int, side: str) -> torch.Tensor:
    return padded([[1.0] * len(r) for r in rows], width, side, 0.0)


def log_ratios(ratios: list[list[float]], width: int, side: str) -> torch.Tensor:
    """logp with old_logp = 0 so that exp(logp - old_logp) is the given ratio; nan on padding."""
    return padded([[math.log(r) for r in row] for row in ratios], width, side, NAN).requires_grad_()


def real_grads(grad: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """Each row's gradient on its real tokens, checking it is exactly 0 on padding."""
    assert (grad[mask == 0] == 0).all()
    return [grad[i][mask[i] > 0].tolist() for i in range(grad.shape[0])]


def close_rows(actual: list[list[float]], expected: list[list[float]]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        close(t(a), e)


# ---------------------------------------------------------------- group advantages
# Three groups of 4:
#  g0 [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25], squares sum 0.5625 + 3 * 0.0625 = 0.75
#     unbiased var 0.75 / 3 = 0.25 -> std 0.5 (the biased std sqrt(0.75 / 4) = 0.433 would give 1.732 below)
#  g1 [2, 4, 6, 8]: mean 5, deviations [-3, -1, 1, 3], squares sum 20, unbiased var 20 / 3 -> std 2.5819888975
#  g2 [3, 3, 3, 3]: all equal -> exactly 0
SCORES = t([1, 0, 0, 0, 2, 4, 6, 8, 3, 3, 3, 3])


def test_group_advantages_std_by_hand():
    s1 = 2.5819888974716112  # sqrt(20 / 3)
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]  # std + eps = 0.500001
    expected += [d / (s1 + 1e-6) for d in (-3.0, -1.0, 1.0, 3.0)]
    expected += [0.0, 0.0, 0.0, 0.0]
    close(group_advantages(SCORES, 4), expected)
    # eps 0: g0 [1.5, -0.5, -0.5, -0.5]; g1 3 / sqrt(20/3) = 3 * sqrt(0.15) = 1.1618950039, 1 / sqrt(20/3) = 0.3872983346
    close(group_advantages(SCORES, 4, eps=0.0)[:8], [1.5, -0.5, -0.5, -0.5, -1.1618950039, -0.3872983346, 0.3872983346, 1.1618950039], atol=1e-9)


def test_group_advantages_without_std_is_dr_grpo():
    # r - mean: g0 mean 0.25, g1 mean 5, g2 mean 3
    close(group_advantages(SCORES, 4, scale="none"), [0.75, -0.25, -0.25, -0.25, -3, -1, 1, 3, 0, 0, 0, 0])


def test_group_advantages_of_equal_rewards_are_exactly_zero():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004 in floats: a plain mean is 0.1 + 1 ulp, and (r - mean) / (0 + eps)
    # would be ~1e-11, not 0; eps 0 would give 0 / 0 = nan.
    for scores in (t([0.1, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.1], dtype=torch.float32), t([7.0, 7.0])):
        for eps in (1e-6, 0.0):
            adv = group_advantages(scores, scores.shape[0], eps=eps)
            assert (adv == 0).all(), adv
    assert (group_advantages(t([0.3, 0.7]), 1) == 0).all()  # a lone response is its own mean: 0, not nan


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="std, none"):
        group_advantages(SCORES, 4, scale="max")
    with pytest.raises(ValueError, match="multiple of group_size 5"):
        group_advantages(SCORES, 5)


def test_nonzero_groups():
    # [1, 0] differ, [3, 3] equal, [0, 1] differ, [0.2, 0.2] equal
    assert nonzero_groups(t([1, 0, 3, 3, 0, 1, 0.2, 0.2]), 2).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="multiple"):
        nonzero_groups(t([1, 0, 3]), 2)


# ---------------------------------------------------------------- overlong penalty
def test_overlong_penalty_by_hand():
    # max 20, cache 4: no penalty up to 16; then (16 - L) / 4: L=17 -> -0.25, L=19 -> -0.75, L=20 -> -1; beyond: -1
    lengths = torch.tensor([10, 16, 17, 19, 20, 21, 100])
    penalty = overlong_penalty(lengths, max_length=20, cache_length=4)
    assert penalty.dtype == torch.get_default_dtype()
    close(penalty.double(), [0.0, 0.0, -0.25, -0.75, -1.0, -1.0, -1.0])
    # cache == max: the ramp starts at 0; L = 5 of 10 -> -0.5
    close(overlong_penalty(t([0.0, 5.0, 10.0, 11.0]), 10, 10), [0.0, -0.5, -1.0, -1.0])
    for cache in (0, -1, 21):
        with pytest.raises(ValueError, match="cache_length"):
            overlong_penalty(lengths, max_length=20, cache_length=cache)


# ---------------------------------------------------------------- aggregations
# Four rows, groups of 2: r0 [1, 2, 3], r1 [5], r2 [2, 2], r3 no real token.
#  token-mean: (1 + 2 + 3 + 5 + 2 + 2) / 6 = 15 / 6 = 2.5
#  seq-mean-token-mean: row means 2, 5, 2 (r3 left out) -> 9 / 3 = 3 (counting r3 as 0 would give 9 / 4 = 2.25)
#  group-token-mean: g0 (1 + 2 + 3 + 5) / 4 = 2.75, g1 (2 + 2) / 2 = 2 -> 2.375
AGG_ROWS = [[1.0, 2.0, 3.0], [5.0], [2.0, 2.0], []]


@pytest.mark.parametrize("side", SIDES)
def test_aggregate_tokens_by_hand(side):
    values = padded(AGG_ROWS, 4, side, NAN).requires_grad_()
    mask = mask_of(AGG_ROWS, 4, side)
    assert aggregate_tokens(values, mask).item() == pytest.approx(2.5)
    assert aggregate_tokens(values, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_tokens(values, mask, "group-token-mean", group_size=2).item() == pytest.approx(2.375)
    # groups of the whole batch are the token mean, groups of one row the row mean
    assert aggregate_tokens(values, mask, "group-token-mean", group_size=4).item() == pytest.approx(2.5)
    assert aggregate_tokens(values, mask, "group-token-mean", group_size=1).item() == pytest.approx(3.0)
    # d/dx of seq-mean-token-mean: 1 / (row length * 3 rows): r0 1/9, r1 1/3, r2 1/6; padding 0 (no nan)
    aggregate_tokens(values, mask, "seq-mean-token-mean").backward()
    close_rows(real_grads(values.grad, mask), [[1 / 9] * 3, [1 / 3], [1 / 6] * 2, []])


def test_aggregate_tokens_without_real_tokens_is_zero_not_nan():
    values, mask = t([[INF, NAN], [1.0, 2.0]]), t([[0, 0], [0, 0]])
    assert aggregate_tokens(values, mask, "seq-mean-token-mean").item() == 0.0
    assert aggregate_tokens(values, mask, "group-token-mean", group_size=2).item() == 0.0


def test_aggregate_tokens_bad_input():
    values, mask = t([[1.0], [2.0], [3.0]]), t([[1], [1], [1]])
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, group-token-mean"):
        aggregate_tokens(values, mask, "sum")
    with pytest.raises(ValueError, match="group_size"):
        aggregate_tokens(values, mask, "group-token-mean")
    with pytest.raises(ValueError, match="multiple of group_size 2"):
        aggregate_tokens(values, mask, "group-token-mean", group_size=2)


# ---------------------------------------------------------------- policy loss: clip-higher, aggregates, bounds
@pytest.mark.parametrize("side", SIDES)
def test_policy_loss_clip_higher_by_hand(side):
    # clip 0.2, clip_high 0.28: band [0.8, 1.28]; 5 real tokens
    #  A=+1 r=1.25 inside (a symmetric 1.2 would clip it) -> -1.25          grad -A*r/5 = -0.25
    #  A=+1 r=1.5  above 1.28                          -> -1.28 (clipped)   grad 0
    #  A=-1 r=0.7  below 0.8                           -> max(0.7, 0.8) = 0.8 (clipped) grad 0
    #  A=-1 r=1.5  (neg A: no clip up)                 -> max(1.5, 1.28) = 1.5  grad 1.5/5 = 0.3
    #  A=+1 r=0.5  (pos A: no clip down)               -> max(-0.5, -0.8) = -0.5 grad -0.5/5 = -0.1
    # loss = (-1.25 - 1.28 + 0.8 + 1.5 - 0.5) / 5 = -0.146 (clip_high 0.2: (-1.2 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.12)
    # clipfrac 2/5, low 1/5, high 1/5: the last two tokens lie outside the band but keep their gradient
    ratios = [[1.25, 1.5, 0.7, 1.5, 0.5]]
    logp, mask = log_ratios(ratios, 7, side), mask_of(ratios, 7, side)
    advantages = padded([[1.0, 1.0, -1.0, -1.0, 1.0]], 7, side, INF)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.146)
    assert (stats["clipfrac"], stats["clipfrac_low"], stats["clipfrac_high"]) == pytest.approx((0.4, 0.2, 0.2))
    loss.backward()
    close_rows(real_grads(logp.grad, mask), [[-0.25, 0.0, 0.0, 0.3, -0.1]])
    symmetric, _ = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2)
    assert symmetric.item() == pytest.approx(-0.12)


# Four rows in two groups, clip 0.2 (band [0.8, 1.2]), one advantage per row:
#  r0 A=+1 ratios [1.1, 1.5, 1.0] -> [-1.1, -1.2 (clipped, high), -1.0]        sum -3.3, 3 tokens
#  r1 A=-2 ratios [0.5, 1.1]      -> [max(1.0, 1.6) = 1.6 (clipped, low), 2.2]  sum  3.8, 2 tokens
#  r2 A=+2 ratios [0.9]           -> [-1.8]                                     sum -1.8, 1 token
#  r3 A=-1 ratios [1.0, 1.0, 2.0] -> [1, 1, max(2, 1.2) = 2]                    sum  4.0, 3 tokens
# token-mean:          (-3.3 + 3.8 - 1.8 + 4) / 9 = 2.7 / 9 = 0.3
# seq-mean-token-mean: (-1.1 + 1.9 - 1.8 + 4/3) / 4 = (1/3) / 4 = 1/12
# group-token-mean:    g0 (-3.3 + 3.8) / 5 = 0.1, g1 (-1.8 + 4) / 4 = 0.55 -> 0.325
# clipfrac 2/9 (high 1/9, low 1/9) whatever the aggregate.
GROUP_RATIOS = [[1.1, 1.5, 1.0], [0.5, 1.1], [0.9], [1.0, 1.0, 2.0]]
GROUP_ADV = [1.0, -2.0, 2.0, -1.0]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(
    ("aggregate", "expected"), [("token-mean", 0.3), ("seq-mean-token-mean", 1 / 12), ("group-token-mean", 0.325)]
)
def test_policy_loss_aggregates_by_hand(side, aggregate, expected):
    logp, mask = log_ratios(GROUP_RATIOS, 5, side), mask_of(GROUP_RATIOS, 5, side)
    per_row = t(GROUP_ADV)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), per_row, mask, clip=0.2, aggregate=aggregate, group_size=2)
    assert loss.item() == pytest.approx(expected)
    assert (stats["clipfrac"], stats["clipfrac_low"], stats["clipfrac_high"]) == pytest.approx((2 / 9, 1 / 9, 1 / 9))
    # [batch] advantages are the same as each row's advantage on all its tokens (garbage on padding)
    per_token = torch.where(mask > 0, per_row[:, None].expand_as(mask), t(NAN))
    same, _ = policy_loss(logp, torch.zeros_like(logp), per_token, mask, clip=0.2, aggregate=aggregate, group_size=2)
    assert same.item() == loss.item()


@pytest.mark.parametrize("side", SIDES)
def test_policy_loss_group_token_mean_gradient_by_hand(side):
    # d/dlogp of an unclipped -A*r is -A*r, weighed 1 / (tokens of the group * 2 groups): g0 1/10, g1 1/8
    #  r0: -1.1/10 = -0.11, clipped 0, -1.0/10 = -0.1     r1: clipped 0, 2*1.1/10 = 0.22
    #  r2: -2*0.9/8 = -0.225                              r3: 1/8 = 0.125, 0.125, 2/8 = 0.25
    logp, mask = log_ratios(GROUP_RATIOS, 5, side), mask_of(GROUP_RATIOS, 5, side)
    loss, _ = policy_loss(logp, torch.zeros_like(logp), t(GROUP_ADV), mask, clip=0.2, aggregate="group-token-mean", group_size=2)
    loss.backward()
    close_rows(real_grads(logp.grad, mask), [[-0.11, 0.0, -0.1], [0.0, 0.22], [-0.225], [0.125, 0.125, 0.25]])


@pytest.mark.parametrize("side", SIDES)
def test_policy_loss_with_per_token_bounds_by_hand(side):
    # bounds replace [1 - clip, 1 + clip] (clip 0.2 is ignored); 4 real tokens:
    #  low 0.5  high 3.0  A=+1 r=2.5 inside                    -> -2.5              grad -2.5/4 = -0.625
    #  low 0.75 high 1.25 A=+1 r=1.5 above                     -> -1.25 (clipped)    grad 0
    #  low 0.9  high 1.1  A=-1 r=0.8 below                     -> max(0.8, 0.9) = 0.9 (clipped) grad 0
    #  low 0.5  high 10   A=-1 r=0.4 below                     -> max(0.4, 0.5) = 0.5 (clipped) grad 0
    # loss = (-2.5 - 1.25 + 0.9 + 0.5) / 4 = -0.5875; clipfrac 3/4 (low 2/4, high 1/4)
    ratios = [[2.5, 1.5, 0.8, 0.4]]
    logp, mask = log_ratios(ratios, 6, side), mask_of(ratios, 6, side)
    advantages = padded([[1.0, 1.0, -1.0, -1.0]], 6, side, NAN)
    low = padded([[0.5, 0.75, 0.9, 0.5]], 6, side, 5.0)  # padding: low above high, must not matter
    high = padded([[3.0, 1.25, 1.1, 10.0]], 6, side, NAN)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, bounds=(low, high))
    assert loss.item() == pytest.approx(-0.5875)
    assert (stats["clipfrac"], stats["clipfrac_low"], stats["clipfrac_high"]) == pytest.approx((0.75, 0.5, 0.25))
    loss.backward()
    close_rows(real_grads(logp.grad, mask), [[-0.625, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="bounds"):
        policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, bounds=(low[:, :2], high))


def test_policy_loss_with_dynamic_bounds_end_to_end():
    # old probability q = 0.32, eps_low 0.06, eps_high 0.1 -> bounds (0.75, 1.25) (see the dynamic bounds test)
    #  A=+1 r=1.3 -> -1.25 (clipped); A=+1 r=1.2 -> -1.2 (inside, a fixed clip 0.2 would be at its edge); mean -1.225
    old = t([[math.log(0.32), math.log(0.32)]])
    logp = (old + t([[math.log(1.3), math.log(1.2)]])).detach().requires_grad_()
    bounds = dynamic_clip_bounds(old.exp(), 0.06, 0.1)
    loss, stats = policy_loss(logp, old, t([1.0]), t([[1, 1]]), clip=0.2, bounds=bounds)
    assert loss.item() == pytest.approx(-1.225) and stats["clipfrac"] == pytest.approx(0.5)
    loss.backward()
    close(logp.grad, [[0.0, -0.6]])  # -A*r/2 = -1.2/2


def test_policy_loss_bad_advantage_shape():
    logp = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, logp, t([1.0, 2.0, 3.0]), t([[1, 1]]), clip=0.2)


# ---------------------------------------------------------------- GSPO
# clip 0.2 (band [0.8, 1.2]); token ratios per row and s_i = their geometric mean = exp(mean log ratio):
#  r0 [1.0, 1.21]    s = sqrt(1.21) = 1.1, A=+1 -> -1.1 inside              grad per token -A*s/(2 tokens * 4 rows) = -0.1375
#  r1 [8, 1, 1]      s = 8^(1/3) = 2,      A=+1 -> -1.2 clipped (high)      grad 0 on all 3 tokens, though 2 have ratio 1
#  r2 [0.5]          s = 0.5,              A=-1 -> max(0.5, 0.8) = 0.8 clipped (low), grad 0
#  r3 [0.25, 4]      s = 1,                A=-2 -> 2                         grad 2*1/(2*4) = 0.25 per token
#  r4 no real token, advantage nan: left out (4 rows count)
# loss = (-1.1 - 1.2 + 0.8 + 2) / 4 = 0.125; 8 real tokens: clipfrac (3 + 1)/8 = 0.5, high 3/8, low 1/8
# ratio_mean over tokens = (1.1*2 + 2*3 + 0.5 + 1*2) / 8 = 10.7 / 8 = 1.3375
# (per-token PPO would clip only r1's ratio-8 token and r2's, and move r1's other two tokens.)
GSPO_RATIOS = [[1.0, 1.21], [8.0, 1.0, 1.0], [0.5], [0.25, 4.0], []]
GSPO_ADV = [1.0, 1.0, -1.0, -2.0, NAN]


def gspo_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [[math.log(r) for r in row] for row in GSPO_RATIOS]
    return padded(rows, 4, side, NAN).requires_grad_(), mask_of(GSPO_RATIOS, 4, side)


@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("side", SIDES)
def test_sequence_policy_loss_by_hand(side, token_level):
    logp, mask = gspo_batch(side)
    old = torch.where(mask > 0, t(0.0), t(INF))
    loss, stats = sequence_policy_loss(logp, old, t(GSPO_ADV), mask, clip=0.2, token_level=token_level)
    assert loss.item() == pytest.approx(0.125)
    assert (stats["clipfrac"], stats["clipfrac_low"], stats["clipfrac_high"]) == pytest.approx((0.5, 1 / 8, 3 / 8))
    assert stats["ratio_mean"] == pytest.approx(1.3375)
    # approx_kl = 0.5 * mean of (log ratio)^2 over the 8 tokens
    kl = 0.5 * (math.log(1.21) ** 2 + math.log(8) ** 2 + math.log(0.5) ** 2 + 2 * math.log(4) ** 2) / 8
    assert stats["approx_kl"] == pytest.approx(kl)
    loss.backward()  # GSPO-token with one advantage per row: the same gradient
    close_rows(real_grads(logp.grad, mask), [[-0.1375] * 2, [0.0] * 3, [0.0], [0.25] * 2, []])


def test_sequence_policy_loss_clip_high():
    # s = 1.1 with A=+1: clipped at 1.05 when clip_high = 0.05 -> -1.05, grad 0; clip 0.2 alone leaves it inside
    logp, mask = t([[0.0, math.log(1.21)]]).requires_grad_(), t([[1, 1]])
    loss, stats = sequence_policy_loss(logp, torch.zeros_like(logp), t([1.0]), mask, clip=0.2, clip_high=0.05)
    assert loss.item() == pytest.approx(-1.05) and stats["clipfrac_high"] == 1.0
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])


@pytest.mark.parametrize("side", SIDES)
def test_gspo_token_with_per_token_advantages_by_hand(side):
    # Same ratios, per-token advantages; each token's weight is s_i in value, so it clips token by token:
    #  r0 s=1.1  A [+1, -1]     -> [-1.1, max(1.1, 1.1) = 1.1]             mean 0      grads -1.1/8, +1.1/8
    #  r1 s=2    A [+1, +1, -1] -> [-1.2, -1.2 (clipped), max(2, 1.2) = 2]  mean -0.4/3 grads 0, 0, 2/(3*4) = 1/6
    #  r2 s=0.5  A [-1]         -> 0.8 clipped                              mean 0.8    grad 0
    #  r3 s=1    A [-2, 0]      -> [2, 0]                                    mean 1      grads 2/(2*4) = 0.25, 0
    # loss = (0 - 0.4/3 + 0.8 + 1) / 4 = 0.4166..; clipfrac 3/8 (r1's two tokens high, r2's low)
    logp, mask = gspo_batch(side)
    advantages = padded([[1.0, -1.0], [1.0, 1.0, -1.0], [-1.0], [-2.0, 0.0], []], 4, side, NAN)
    loss, stats = sequence_policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, token_level=True)
    assert loss.item() == pytest.approx((1.8 - 0.4 / 3) / 4)
    assert (stats["clipfrac"], stats["clipfrac_low"], stats["clipfrac_high"]) == pytest.approx((3 / 8, 1 / 8, 2 / 8))
    loss.backward()
    close_rows(real_grads(logp.grad, mask), [[-0.1375, 0.1375], [0.0, 0.0, 1 / 6], [0.0], [0.25, 0.0], []])
    with pytest.raises(ValueError, match=r"\[batch\]"):
        sequence_policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2)


# ---------------------------------------------------------------- DCPO dynamic clip bounds
def test_dynamic_clip_bounds_by_hand():
    # eps_low 0.06, eps_high 0.1:
    #  q=1:      low (1 + sqrt(1 - 0.24)) / 2 = (1 + 0.8717797887) / 2 = 0.9358898944; high (1 + sqrt(1.4)) / 2 = 1.0916079783
    #  q=0.32:   4*0.06/0.32 = 0.75 -> low (1 + 0.5) / 2 = 0.75; 4*0.1/0.32 = 1.25 -> high (1 + 1.5) / 2 = 1.25
    #  q=0.24:   4*0.06/0.24 = 1 -> low (1 + 0) / 2 = 0.5; 4*0.1/0.24 = 5/3 -> high (1 + sqrt(8/3)) / 2 = 1.3164965809
    #  q=0.0125: 1 - 19.2 < 0 -> low 0.5; 1 + 32 = 33 -> high (1 + 5.7445626465) / 2 = 3.3722813233
    #  q=0.001:  high (1 + sqrt(401)) / 2 = 10.5124921973 -> capped at max_high 10
    #  q=0:      low 0.5, high max_high (no nan)
    q = t([1.0, 0.32, 0.24, 0.0125, 0.001, 0.0])
    low, high = dynamic_clip_bounds(q, 0.06, 0.1)
    close(low, [0.9358898944, 0.75, 0.5, 0.5, 0.5, 0.5], atol=1e-9)
    close(high, [1.0916079783, 1.25, 1.3164965809, 3.3722813233, 10.0, 10.0], atol=1e-9)
    _, high = dynamic_clip_bounds(q, 0.06, 0.1, max_high=12.0)
    close(high[4:], [10.5124921973, 12.0], atol=1e-9)
    low, high = dynamic_clip_bounds(torch.zeros(3), 0.0, 0.0)  # eps 0 is the unclipped-nothing band [1, 1]
    assert not low.isnan().any() and (low == 1).all() and (high == 1).all()
    with pytest.raises(ValueError, match="eps_low"):
        dynamic_clip_bounds(q, -0.1, 0.1)
    with pytest.raises(ValueError, match="max_high"):
        dynamic_clip_bounds(q, 0.1, 0.1, max_high=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_clip_bounds_tighten_as_old_probability_rises(dtype):
    q = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=dtype).sort().values
    q = torch.cat([torch.zeros(1, dtype=dtype), q, torch.ones(1, dtype=dtype)])
    low, high = dynamic_clip_bounds(q, 0.2, 0.28)
    assert not (low.isnan().any() or high.isnan().any())
    assert (low <= 1).all() and (high >= 1).all()
    assert (low.diff() >= 0).all() and (high.diff() <= 0).all()  # q rises: low rises, high falls
    assert low[-1] < low[0] + 1 and high[0] > high[-1]  # and they do move: 0.5 -> (1 + sqrt(0.2)) / 2, 10 -> 1.3
    close(torch.stack([low[-1], high[-1]]).double(), [(1 + math.sqrt(0.2)) / 2, (1 + math.sqrt(2.12)) / 2], atol=1e-6)


# ---------------------------------------------------------------- DCPO smooth advantage standardisation
def test_cumulative_reward_stats_two_visits_by_hand():
    # Visit 1 scores [0, 1]: mean 0.5, unbiased std sqrt(0.5). Visit 2 scores [1, 1]: mean 1, std 0. n = 1:
    #  mean = (0.5 * 1 + 1) / 2 = 0.75
    #  var  = (1 * 0.5 + 0 + 1/2 * (1 - 0.5)^2) / 2 = (0.5 + 0.125) / 2 = 0.3125 -> std 0.5590169944
    # The pooled std of all four scores [0, 1, 1, 1] (mean 0.75, squared deviations 0.5625 + 3 * 0.0625 = 0.75) is
    # sqrt(0.75 / 3) = 0.5 unbiased and sqrt(0.75 / 4) = 0.4330127019 biased. Fed the visits' biased stds
    # (0.5 and 0) the rule gives (0.25 + 0 + 0.125) / 2 = 0.1875 -> 0.4330127019, the biased pooled std exactly;
    # fed unbiased ones (as DCPO does) it gives 0.559, more than the unbiased pooled 0.5.
    mean, std = cumulative_reward_stats(t([0.5]), t([math.sqrt(0.5)]), torch.tensor([1]), t([1.0]), t([0.0]))
    close(mean, [0.75])
    close(std, [0.5590169944], atol=1e-9)
    _, biased = cumulative_reward_stats(t([0.5]), t([0.5]), torch.tensor([1]), t([1.0]), t([0.0]))
    close(biased, [0.4330127019], atol=1e-9)


def test_cumulative_reward_stats_third_visit_and_first_visit():
    # n = 2 visits with mean 0.25, std 0.5; this visit mean 0.75, std 0.5:
    #  mean = (2 * 0.25 + 0.75) / 3 = 1.25 / 3 = 5/12
    #  var  = (2 * 0.25 + 0.25 + 2/3 * 0.5^2) / 3 = (0.75 + 1/6) / 3 = 11/36 -> std sqrt(11) / 6 = 0.5527707984
    # Second group: first visit (count 0): the new statistics, whatever the old ones hold (nan here).
    mean, std = cumulative_reward_stats(t([0.25, NAN]), t([0.5, NAN]), torch.tensor([2, 0]), t([0.75, 3.0]), t([0.5, 2.0]))
    close(mean, [5 / 12, 3.0])
    close(std, [0.5527707984, 2.0], atol=1e-9)


def test_smooth_advantages_first_visit_is_group_advantages():
    scores = torch.rand(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64).round(decimals=1)
    scores[:6] = 0.7  # one group of equal rewards
    adv, mean, std = smooth_advantages(scores, 6, t([NAN] * 4), t([NAN] * 4), torch.zeros(4, dtype=torch.long))
    close(adv, group_advantages(scores, 6).tolist(), atol=1e-12)
    close(mean, scores.reshape(4, 6).mean(dim=1).tolist(), atol=1e-12)
    close(std, [0.0, *scores.reshape(4, 6)[1:].std(dim=1).tolist()], atol=1e-12)


def test_smooth_advantages_equal_rewards_on_a_second_visit_are_not_zero():
    # Visit 1 of the prompt scored [0, 1] (mean 0.5, std sqrt(0.5)); now [1, 1]: A_new = 0 (std 0), and the
    # cumulative mean 0.75, std sqrt(0.3125) give A_tot = 0.25 / sqrt(0.3125) = 1 / sqrt(5) = 0.4472135955.
    # i = 2: SA_1 = SA_2 = 0.5 * 0 + 0.5 * 0.4472135955 = 0.2236067977 (GRPO would give 0: no gradient).
    scores = t([1.0, 1.0])
    adv, mean, std = smooth_advantages(scores, 2, t([0.5]), t([math.sqrt(0.5)]), torch.tensor([1]), eps=0.0)
    close(adv, [0.2236067977, 0.2236067977], atol=1e-9)
    close(mean, [0.75])
    close(std, [math.sqrt(0.3125)])
    assert (group_advantages(scores, 2) == 0).all()
    adv, _, _ = smooth_advantages(scores, 2, t([0.5]), t([math.sqrt(0.5)]), torch.tensor([1]))
    close(adv, [0.5 * 0.25 / (math.sqrt(0.3125) + 1e-6)] * 2, atol=1e-12)  # eps in the denominator


def test_smooth_advantages_takes_the_smaller_of_the_two_mixtures():
    # Group 0, third visit (old_count 2, old mean 0.25, std 0.5), scores [1, 0, 1, 1]: mean 0.75, deviations
    # [0.25, -0.75, 0.25, 0.25], squares sum 0.75, unbiased std sqrt(0.25) = 0.5 -> A_new = [0.5, -1.5, 0.5, 0.5].
    # Cumulative (see above): mean 5/12, std sqrt(11)/6 -> A_tot(1) = (7/12) / (sqrt(11)/6) = 7 / (2 sqrt(11))
    # = 1.0552897060, A_tot(0) = -5 / (2 sqrt(11)) = -0.7537783614. i = 3:
    #  r=1: SA_1 = 2/3 * 0.5 + 1/3 * 1.0552897060 = 0.6850965687; SA_2 = 1/3 * 0.5 + 2/3 * 1.0552897060 = 0.8701931373 -> SA_1
    #  r=0: SA_1 = 2/3 * -1.5 + 1/3 * -0.7537783614 = -1.2512594538; SA_2 = -0.5 - 0.5025189076 = -1.0025189076 -> SA_2
    # Group 1, first visit, all equal [3, 3, 3, 3]: 0.
    scores = t([1.0, 0.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv, mean, std = smooth_advantages(scores, 4, t([0.25, NAN]), t([0.5, NAN]), torch.tensor([2, 0]), eps=0.0)
    close(adv, [0.6850965687, -1.0025189076, 0.6850965687, 0.6850965687, 0, 0, 0, 0], atol=1e-9)
    close(mean, [5 / 12, 3.0])
    close(std, [0.5527707984, 0.0], atol=1e-9)
