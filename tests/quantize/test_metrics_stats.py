"""The report's statistics on hand-made logits, against numbers worked out by hand (llama.cpp's conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandemlm.quantize.report_maths import Agreement, KLDStats, kld_stats, ratio, rms

# Three scored positions over a 2-token vocabulary: P (original) and Q (quantized) as probabilities.
P = [[0.4, 0.6], [0.25, 0.75], [0.6, 0.4]]
Q = [[0.9, 0.1], [0.25, 0.75], [0.2, 0.8]]
WINDOW = [1, 0, 1, 1]  # the targets (next tokens) are 0, 1, 1

# Worked by hand, KL(P || Q) = sum_i p_i ln(p_i / q_i):
KL_1 = 0.4 * math.log(0.4 / 0.9) + 0.6 * math.log(0.6 / 0.1)  # -0.324372 + 1.075056 = 0.750684
KL_2 = 0.0  # the models agree
KL_3 = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)  # 0.659167 - 0.277259 = 0.381909
# Δp = q(target) - p(target): 0.9 - 0.4, 0.75 - 0.75, 0.8 - 0.4
DELTA_P = [0.5, 0.0, 0.4]


def _agreement() -> Agreement:
    # Each row shifted by its own constant: log-softmax removes it, so the logits are not the log-probabilities.
    original = np.log(P) + np.array([[3.0], [-1.0], [0.5]])
    quantized = np.log(Q) + np.array([[0.5], [2.0], [-4.0]])
    agreement = Agreement()
    agreement.add_window(original.astype(np.float32), quantized.astype(np.float32), WINDOW)
    return agreement


def test_kl_values_and_their_statistics_on_hand_worked_numbers():
    assert (KL_1, KL_3) == (pytest.approx(0.750684, abs=1e-6), pytest.approx(0.381909, abs=1e-6))
    agreement = _agreement()
    assert agreement.kl_values == pytest.approx([0.750684, 0.0, 0.381909], abs=1e-5)
    stats = agreement.kld()
    assert stats.mean == pytest.approx((0.750684 + 0.381909) / 3, abs=1e-5)  # 0.377531: per position, not summed
    assert stats.median == pytest.approx(0.381909, abs=1e-5)  # the middle of three
    assert stats.max == pytest.approx(0.750684, abs=1e-5)
    # p99 of 3 sorted values: index 0.99 * 2 = 1.98, so 0.381909 + 0.98 * (0.750684 - 0.381909)
    assert stats.p99 == pytest.approx(0.381909 + 0.98 * 0.368775, abs=1e-5)  # 0.743309
    assert stats.p999 == pytest.approx(0.381909 + 0.998 * 0.368775, abs=1e-5)  # 0.749946
    assert agreement.kl_mean == pytest.approx(stats.mean, abs=1e-12) and agreement.kl_p99 == stats.p99


def test_delta_p_is_the_change_in_the_correct_tokens_probability():
    agreement = _agreement()
    assert agreement.delta_p == pytest.approx(DELTA_P, abs=1e-6)  # signed: the quantized model gained here
    # sqrt((0.25 + 0 + 0.16) / 3) = sqrt(0.136667) = 0.369685
    assert agreement.delta_p_rms == pytest.approx(0.369685, abs=1e-6)


def test_same_top_and_perplexity_ratio_on_hand_worked_numbers():
    agreement = _agreement()
    assert agreement.same_top_rate == pytest.approx(1 / 3)  # only position 2 puts the same token first
    # PPL = exp(mean NLL of the targets): (0.4 * 0.75 * 0.4) ** (-1/3) and (0.9 * 0.75 * 0.8) ** (-1/3)
    assert agreement.perplexity_original == pytest.approx(0.12 ** (-1 / 3), rel=1e-6)  # 2.027400
    assert agreement.perplexity_quantized == pytest.approx(0.54 ** (-1 / 3), rel=1e-6)  # 1.228081
    # the ratio is (0.12 / 0.54) ** (1/3) = 0.605707: the quantized model is more sure of these targets
    assert ratio(agreement.perplexity_quantized, agreement.perplexity_original) == pytest.approx(0.605707, abs=1e-6)


def test_kld_stats_follow_llama_perplexity_conventions():
    # Even count: the median is the mean of the two middle values (0.2 and 0.3).
    stats = kld_stats([0.1, 0.4, 0.2, 0.3])
    # percentile(f) = sorted[i] + (f * (n - 1) - i) * (sorted[i + 1] - sorted[i]), i = floor(f * (n - 1)):
    # 0.99 * 3 = 2.97 -> 0.3 + 0.97 * 0.1; 0.999 * 3 = 2.997 -> 0.3 + 0.997 * 0.1
    assert stats == KLDStats(mean=pytest.approx(0.25), median=pytest.approx(0.25), p99=pytest.approx(0.397),
                             p999=pytest.approx(0.3997), max=0.4)
    assert kld_stats([]) == KLDStats(0.0, 0.0, 0.0, 0.0, 0.0)
    one_outlier = kld_stats([0.0] * 999 + [5.0])  # a single bad position shows in max and p99.9, not in the median
    # p99.9: 0.999 * 999 = 998.001, a thousandth of the way from sorted[998] = 0 to sorted[999] = 5
    assert one_outlier.median == 0 == one_outlier.p99 and one_outlier.max == 5 and one_outlier.p999 == pytest.approx(0.005)


def test_rms_and_ratio_edge_cases():
    assert rms([3.0, -4.0]) == pytest.approx(math.sqrt(12.5))  # the sign does not cancel, unlike a mean
    assert rms([]) == 0.0
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) == math.inf
