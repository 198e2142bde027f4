"""PPO maths on numbers worked by hand (the working is in the comments), float64 throughout."""

from __future__ import annotations

import math

import pytest
import torch

from tandemlm.align.ppo import maths
from tandemlm.align.ppo.maths import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    kl_rewards,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)

NAN = float("nan")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=0, atol=1e-9, equal_nan=True)


def pad(row: list[float], width: int, side: str, fill: float) -> list[float]:
    filler = [fill] * (width - len(row))
    return row + filler if side == "right" else filler + row


def test_defaults():
    assert (maths.DEFAULT_GAMMA, maths.DEFAULT_LAM, maths.DEFAULT_CLIP) == (1.0, 0.95, 0.2)
    assert (maths.DEFAULT_VALUE_CLIP, maths.DEFAULT_REWARD_CLIP, maths.DEFAULT_BETA) == (0.2, 5.0, 0.05)


# ---------------------------------------------------------------- gae
# One row of 3 tokens: r = [1, 2, 3], V = [0.5, 1.0, 1.5]; V after the last token is 0.
R3, V3, M3 = t([[1.0, 2.0, 3.0]]), t([[0.5, 1.0, 1.5]]), t([[1.0, 1.0, 1.0]])


def test_gae_lambda_zero_gives_one_step_td_errors():
    # gamma 0.9: d0 = 1 + 0.9*1.0 - 0.5 = 1.4; d1 = 2 + 0.9*1.5 - 1.0 = 2.35; d2 = 3 + 0.9*0 - 1.5 = 1.5
    adv, ret = gae(R3, V3, M3, gamma=0.9, lam=0.0)
    close(adv, [[1.4, 2.35, 1.5]])
    close(ret, [[1.9, 3.35, 3.0]])  # A + V


def test_gae_lambda_one_gamma_one_gives_returns_to_go_minus_values():
    # returns-to-go: [1+2+3, 2+3, 3] = [6, 5, 3]; minus V: [5.5, 4.0, 1.5]
    adv, ret = gae(R3, V3, M3, gamma=1.0, lam=1.0)
    close(adv, [[5.5, 4.0, 1.5]])
    close(ret, [[6.0, 5.0, 3.0]])


def test_gae_three_tokens_by_hand():
    # gamma 0.9, lam 0.5 -> gamma*lam = 0.45; deltas as above [1.4, 2.35, 1.5]
    # A2 = 1.5; A1 = 2.35 + 0.45*1.5 = 3.025; A0 = 1.4 + 0.45*3.025 = 2.76125
    adv, ret = gae(R3, V3, M3, gamma=0.9, lam=0.5)
    close(adv, [[2.76125, 3.025, 1.5]])
    close(ret, [[3.26125, 4.025, 3.0]])


@pytest.mark.parametrize("side", ["right", "left"])
def test_gae_ragged_rows_match_each_row_alone(side):
    rows = [([1.0, 2.0, 3.0, -1.0], [0.5, 1.0, 1.5, 0.3]), ([0.5, -1.0], [0.2, 0.4]), ([2.0], [0.7])]
    width = 5
    # Padding holds garbage: a recursion that reads it (or bootstraps from it) gives different numbers.
    rewards = t([pad(r, width, side, 99.0) for r, _ in rows])
    values = t([pad(v, width, side, NAN) for _, v in rows])
    mask = t([pad([1.0] * len(r), width, side, 0.0) for r, _ in rows])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, (r, v) in enumerate(rows):
        alone_adv, alone_ret = gae(t([r]), t([v]), t([[1.0] * len(r)]), gamma=0.9, lam=0.8)
        real = mask[i] > 0
        close(adv[i][real], alone_adv[0].tolist())
        close(ret[i][real], alone_ret[0].tolist())
        assert (adv[i][~real] == 0).all() and (ret[i][~real] == 0).all()
    # Row 1 by hand, gamma*lam = 0.72: A1 = -1 - 0.4 = -1.4; A0 = 0.5 + 0.9*0.4 - 0.2 + 0.72*(-1.4) = -0.348
    close(adv[1][mask[1] > 0], [-0.348, -1.4])


def test_gae_has_no_gradient():
    values = V3.clone().requires_grad_()
    adv, ret = gae(R3, values, M3, gamma=1.0, lam=0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- kl and rewards
# logp and ref for 2 rows; row 0 has 2 real tokens, row 1 has 3.
LOGP = [[-1.0, -2.0], [-0.5, -1.5, -1.0]]
REF = [[-1.5, -1.0], [-0.5, -2.0, -0.5]]


def rollout(side: str, scores: list[float]) -> tuple[torch.Tensor, ...]:
    logp = t([pad(r, 3, side, -7.0) for r in LOGP])
    ref = t([pad(r, 3, side, -0.1) for r in REF])
    mask = t([pad([1.0] * len(r), 3, side, 0.0) for r in LOGP])
    return logp, ref, t(scores), mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_kl_rewards_score_on_last_real_token(side):
    # k1 = logp - ref: row 0 [0.5, -1.0], row 1 [0.0, 0.5, -0.5]; beta 0.1 -> -beta*kl: [-0.05, 0.1], [0, -0.05, 0.05]
    # scores [2, -0.5] within clip 5, added on the last real token: row 0 0.1+2 = 2.1; row 1 0.05-0.5 = -0.45
    logp, ref, scores, mask = rollout(side, [2.0, -0.5])
    rewards, kl, non_score = kl_rewards(logp, ref, scores, mask, beta=0.1, clip=5.0)
    close(rewards, [pad([-0.05, 2.1], 3, side, 0.0), [0.0, -0.05, -0.45]])
    close(kl, [pad([0.5, -1.0], 3, side, 0.0), [0.0, 0.5, -0.5]])
    close(non_score, [pad([-0.05, 0.1], 3, side, 0.0), [0.0, -0.05, 0.05]])


def test_kl_rewards_clips_the_score():
    # scores [10, -10] clipped to [5, -5]: row 0 last token 0.1 + 5 = 5.1; row 1 0.05 - 5 = -4.95
    logp, ref, scores, mask = rollout("right", [10.0, -10.0])
    rewards, _, _ = kl_rewards(logp, ref, scores, mask, beta=0.1, clip=5.0)
    close(rewards, [[-0.05, 5.1, 0.0], [0.0, -0.05, -4.95]])
    # clip None: 0.1 + 10 = 10.1; 0.05 - 10 = -9.95
    rewards, _, _ = kl_rewards(logp, ref, scores, mask, beta=0.1, clip=None)
    close(rewards, [[-0.05, 10.1, 0.0], [0.0, -0.05, -9.95]])


def test_kl_rewards_k3():
    # k3 = exp(d) - 1 - d, d = ref - logp: row 0 d = [-0.5, 1.0] -> [e^-0.5 - 0.5, e - 2]; row 1 d = [0, -0.5, 0.5]
    logp, ref, scores, mask = rollout("right", [0.0, 0.0])
    _, kl, _ = kl_rewards(logp, ref, scores, mask, beta=0.1, clip=5.0, kind="k3")
    a, b, c = math.exp(-0.5) - 0.5, math.e - 2.0, math.exp(0.5) - 1.5
    close(kl, [[a, b, 0.0], [0.0, a, c]])


def test_kl_penalty_k3_by_hand_and_never_negative():
    # logp -1, ref -1.5: d = -0.5 -> e^-0.5 - 1 + 0.5 = 0.1065306597; logp -2, ref -1: d = 1 -> e - 2 = 0.7182818285
    close(kl_penalty(t([[-1.0, -2.0]]), t([[-1.5, -1.0]]), "k3"), [[0.1065306597126334, 0.7182818284590451]])
    close(kl_penalty(t([[-1.0, -2.0]]), t([[-1.5, -1.0]]), "k1"), [[0.5, -1.0]])
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 32, generator=gen) * 3, torch.randn(64, 32, generator=gen) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_kl_penalty_unknown_kind_lists_known_kinds():
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(t([[0.0]]), t([[0.0]]), "k9")


def test_last_token_index():
    mask = t([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]
    assert last_token_index(mask.bool()).dtype == torch.long
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_index(t([[1, 0], [0, 0]]))


# ---------------------------------------------------------------- policy loss
def logprobs_for(ratios: list[list[float]]) -> torch.Tensor:
    """logp with old_logp = 0, so that exp(logp - old_logp) is the given ratio."""
    return t([[math.log(r) for r in row] for row in ratios]).requires_grad_()


def test_policy_loss_inside_band_is_minus_advantage_times_ratio():
    # clip 0.2, ratios [1.1, 0.9] both inside [0.8, 1.2], A = [1, -2]: mean(-1*1.1, 2*0.9) = (-1.1 + 1.8)/2 = 0.35
    logp = logprobs_for([[1.1, 0.9]])
    loss, stats = policy_loss(logp, torch.zeros_like(logp), t([[1.0, -2.0]]), t([[1.0, 1.0]]), clip=0.2)
    assert loss.item() == pytest.approx(0.35)
    assert stats["clipfrac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    # approx_kl = mean(0.5*log(1.1)^2, 0.5*log(0.9)^2) = 0.5*(0.0090840 + 0.0111008)/2 = 0.0050462
    assert stats["approx_kl"] == pytest.approx(0.25 * (math.log(1.1) ** 2 + math.log(0.9) ** 2))
    # approx_kl_k3 = mean(r - 1 - log r) = ((0.1 - 0.0953102) + (-0.1 + 0.1053605))/2 = 0.0050252
    assert stats["approx_kl_k3"] == pytest.approx((0.1 - math.log(1.1) - 0.1 - math.log(0.9)) / 2)
    # d loss / d logp_t = -A_t * r_t / 2 = [-0.55, 0.9]
    loss.backward()
    close(logp.grad, [[-0.55, 0.9]])


def test_policy_loss_clipped_tokens_by_hand_with_zero_gradient():
    # clip 0.2, old_logp = 0. Row 0: three tokens, row 1: two tokens and one pad.
    #  t0 A=+1 r=1.1 inside band          -> -1.1                  grad -A*r/5 = -0.22
    #  t1 A=+2 r=1.5 > 1.2, clipped       -> max(-3.0, -2.4) = -2.4 grad 0
    #  t2 A=-1 r=0.5 < 0.8, clipped       -> max(0.5, 0.8) = 0.8   grad 0
    #  t3 A=-1 r=1.5 (neg A: no clip up)  -> max(1.5, 1.2) = 1.5   grad 1.5/5 = 0.3
    #  t4 A=+1 r=0.5 (pos A: no clip down)-> max(-0.5, -0.8) = -0.5 grad -0.5/5 = -0.1
    # loss = (-1.1 - 2.4 + 0.8 + 1.5 - 0.5)/5 = -0.34 (per-row means would give (-0.9 + 0.5)/2 = -0.2)
    # clipfrac = 2/5
    logp = logprobs_for([[1.1, 1.5, 0.5], [1.5, 0.5, 50.0]])
    advantages, mask = t([[1.0, 2.0, -1.0], [-1.0, 1.0, 3.0]]), t([[1, 1, 1], [1, 1, 0]])
    loss, stats = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(-0.34)
    assert stats["clipfrac"] == pytest.approx(0.4)
    assert stats["dual_clipfrac"] == 0.0
    loss.backward()
    close(logp.grad, [[-0.22, 0.0, 0.0], [0.3, -0.1, 0.0]])


def test_policy_loss_dual_clip_caps_negative_advantages():
    # clip 0.2, dual clip 3:
    #  A=-1 r=5: max(5, 1.2) = 5, capped at -3*A = 3     grad 0
    #  A=-1 r=2: max(2, 1.2) = 2 < 3, unchanged          grad 2/3
    #  A=+1 r=5: max(-5, -1.2) = -1.2 (no dual clip for A>0), grad 0
    # loss = (3 + 2 - 1.2)/3 = 1.2666..; without dual clip (5 + 2 - 1.2)/3 = 1.9333..
    advantages, mask = t([[-1.0, -1.0, 1.0]]), t([[1.0, 1.0, 1.0]])
    logp = logprobs_for([[5.0, 2.0, 5.0]])
    plain, _ = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2)
    assert plain.item() == pytest.approx(5.8 / 3)
    loss, stats = policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.8 / 3)
    assert stats["dual_clipfrac"] == pytest.approx(1 / 3) and stats["clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 2.0 / 3, 0.0]])
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, torch.zeros_like(logp), advantages, mask, clip=0.2, dual_clip=1.0)


def test_policy_loss_ignores_padding_even_nan():
    logp = t([[math.log(1.1), NAN]]).requires_grad_()
    loss, stats = policy_loss(logp, t([[0.0, 80.0]]), t([[1.0, NAN]]), t([[1.0, 0.0]]), clip=0.2)
    assert loss.item() == pytest.approx(-1.1) and stats["ratio_mean"] == pytest.approx(1.1)
    loss.backward()
    close(logp.grad, [[-1.1, 0.0]])


# ---------------------------------------------------------------- value loss
def test_value_loss_unclipped_has_the_half_factor():
    # V = 0, R = 2: 0.5 * (0 - 2)^2 = 2
    loss, stats = value_loss(t([[0.0]]), t([[0.0]]), t([[2.0]]), t([[1.0]]), clip=None)
    assert loss.item() == pytest.approx(2.0) and stats["value_clipfrac"] == 0.0


def test_value_loss_clipped_by_hand_over_all_masked_tokens():
    # clip 0.2; Vc = V_old + clamp(V - V_old, -0.2, 0.2); 5 real tokens, grad = 0.5 * 2 * (V - R) / 5 where V counts
    #  row 0 t0 V=1.0 Vo=0.9 R=2: Vc = 1.0, (V-R)^2 = 1,    (Vc-R)^2 = 1    -> 1               grad -0.2
    #        t1 V=1.5 Vo=1.0 R=2: Vc = 1.2, (V-R)^2 = 0.25, (Vc-R)^2 = 0.64 -> 0.64 (clipped)  grad 0
    #        t2 V=1.5 Vo=1.0 R=1: Vc = 1.2, (V-R)^2 = 0.25, (Vc-R)^2 = 0.04 -> 0.25            grad 0.1
    #  row 1 t0 V=0   Vo=0   R=1:                                          -> 1               grad -0.2
    #        t1 V=0.5 Vo=0   R=1: Vc = 0.2, (V-R)^2 = 0.25, (Vc-R)^2 = 0.64 -> 0.64 (clipped)  grad 0
    #        t2 padding
    # loss = 0.5 * (1 + 0.64 + 0.25 + 1 + 0.64)/5 = 0.353 (per-row means: 0.5*(1.89/3 + 1.64/2)/2 = 0.3625)
    # value_clipfrac = 2/5; unclipped loss: 0.5 * (1 + 0.25 + 0.25 + 1 + 0.25)/5 = 0.275
    values = t([[1.0, 1.5, 1.5], [0.0, 0.5, NAN]]).requires_grad_()
    old, returns = t([[0.9, 1.0, 1.0], [0.0, 0.0, 4.0]]), t([[2.0, 2.0, 1.0], [1.0, 1.0, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.353)
    assert stats["value_clipfrac"] == pytest.approx(0.4)
    loss.backward()
    close(values.grad, [[-0.2, 0.0, 0.1], [-0.2, 0.0, 0.0]])
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.275)


# ---------------------------------------------------------------- masked statistics
# Real entries {1, 2, 3, 4}: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
# -> biased var 5/4 = 1.25, unbiased var 5/3.
X = t([[1.0, 2.0, 3.0, 99.0], [-50.0, 4.0, NAN, NAN]])
XM = t([[1, 1, 1, 0], [0, 1, 0, 0]])


def test_masked_mean_and_var_by_hand():
    assert masked_mean(X, XM).item() == pytest.approx(2.5)
    close(masked_mean(X, XM, dim=1), [2.0, 4.0])
    assert masked_var(X, XM).item() == pytest.approx(5 / 3)
    assert masked_var(X, XM, unbiased=False).item() == pytest.approx(1.25)
    with pytest.raises(ValueError):
        masked_var(t([[1.0, 2.0]]), t([[1.0, 0.0]]))


def test_masked_whiten_mean_zero_var_one_ignoring_padding():
    white = masked_whiten(X, XM)
    s = math.sqrt(5 / 3 + 1e-8)
    close(white, [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [0.0, 1.5 / s, 0.0, 0.0]])
    assert masked_mean(white, XM).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(white, XM).item() == pytest.approx(1.0, abs=1e-6)
    other_padding = torch.where(XM > 0, X, t(1e6))
    close(masked_whiten(other_padding, XM), white.tolist())


def test_masked_whiten_without_shifting_the_mean():
    # (x - 2.5)/s + 2.5 on real entries, 0 on padding
    s = math.sqrt(5 / 3 + 1e-8)
    expected = [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 0.0], [0.0, 2.5 + 1.5 / s, 0.0, 0.0]]
    close(masked_whiten(X, XM, shift_mean=False), expected)


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0, NAN]]), t([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)  # the mean
    # V = [1, 2, 2]: R - V = [0, 0, 1], var 2/9; var R = 2/3 -> 1 - (2/9)/(2/3) = 2/3
    assert explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(returns, t([[1.0, 1.0, 1.0, 5.0]]), mask))


def test_entropy_from_logits():
    # uniform over 4: log 4; p = [0.25, 0.75] (logits [0, log 3]): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e30, -1e30]]])  # -1e30: finite "masked-out" entries
    close(entropy_from_logits(logits), [[math.log(4.0), 0.5623351446188083]])
    close(entropy_from_logits(logits + 1000.0), [[math.log(4.0), 0.5623351446188083]])  # shift-invariant, stable


# ---------------------------------------------------------------- KL controllers
@pytest.mark.parametrize(
    ("current_kl", "multiplier"),
    [
        (6.6, 1 + 0.1 * 256 / 10000),  # 6.6/6 - 1 = +0.1 -> beta grows by 1.00256
        (5.4, 1 - 0.1 * 256 / 10000),  # 5.4/6 - 1 = -0.1 -> beta shrinks by 0.99744
        (9.0, 1 + 0.2 * 256 / 10000),  # 9/6 - 1 = +0.5, clamped to +0.2 -> 1.00512
        (0.0, 1 - 0.2 * 256 / 10000),  # 0/6 - 1 = -1, clamped to -0.2 -> 0.99488
    ],
)
def test_adaptive_kl_controller_by_hand(current_kl, multiplier):
    controller = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(0.1 * multiplier, rel=1e-12)


def test_kl_controllers_state_dict_round_trip():
    controller = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    for kl in (9.0, 7.0, 2.0):
        controller.update(kl, n_steps=64)
    resumed = AdaptiveKLController(init_beta=0.5, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value
    controller.update(6.5, n_steps=64)
    resumed.update(6.5, n_steps=64)
    assert resumed.value == controller.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="adaptive"):
        other.load_state_dict(controller.state_dict())
