"""Pure functions behind the quality report: windows, perplexity, KL divergence, agreement rates.

Conventions follow llama.cpp's ``llama-perplexity --kl-divergence``: KL is KL(P_original ‖
P_quantized) per position, in nats, summed over the whole vocabulary (llama-perplexity leaves out
tokens with log p_original ≤ -16: 0.14% less on a SmolLM2 Q4_K_M, ``bench/README.md``); its median is the mean of the two middle values for an even
count and its percentiles interpolate linearly between sorted values at ``fraction × (n - 1)``;
Δp is the quantized model's probability of the correct next token minus the original's, and
"RMS Δp" the root of its mean square; "same top" is how often both models put the same token first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ROWS_PER_CHUNK = 64  # log-softmax in float64 over this many rows at a time (bounds memory on 150k vocabularies)


def windows(ids: list[int], size: int, bos: int | None) -> list[list[int]]:
    """Splits ``ids`` into consecutive windows of ``size`` tokens, each starting with ``bos`` if given.

    Every window is scored from its second position on, so each scored token has at least one
    token of context and no window leans on another's cache. Windows of fewer than 2 tokens are dropped.
    """
    if size < 2:
        raise ValueError(f"window size must be at least 2, got {size}")
    step = size - 1 if bos is not None else size
    out = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        window = ([bos] if bos is not None else []) + chunk
        if len(window) >= 2:
            out.append(window)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    values = logits.astype(np.float64)
    peak = values.max(axis=-1, keepdims=True)
    shifted = values - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class KLDStats:
    """The distribution of per-position KL divergences, in nats (llama.cpp's "KL divergence statistics")."""

    mean: float
    median: float
    p99: float
    p999: float
    max: float


def kld_stats(values: Sequence[float] | np.ndarray) -> KLDStats:
    """Mean, median, 99th and 99.9th percentiles and maximum of ``values`` (all 0.0 when empty).

    numpy's default (``linear``) percentile is llama.cpp's: ``fraction × (n - 1)`` into the sorted
    values, interpolated between its two neighbours; its median averages the middle two of an even count.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return KLDStats(0.0, 0.0, 0.0, 0.0, 0.0)
    p99, p999 = np.percentile(data, [99.0, 99.9])
    return KLDStats(float(data.mean()), float(np.median(data)), float(p99), float(p999), float(data.max()))


def rms(values: Sequence[float] | np.ndarray) -> float:
    """Root mean square (0.0 when empty): llama.cpp's "RMS Δp" of the Δp values."""
    data = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(np.mean(data * data))) if data.size else 0.0


def ratio(new: float, old: float) -> float:
    """new / old (inf when old is 0): the perplexity ratio PPL(quantized) / PPL(original)."""
    return new / old if old else math.inf


@dataclass
class Agreement:
    """Running sums and per-position values over the scored positions of one text, original vs quantized."""

    positions: int = 0
    nll_original: float = 0.0
    nll_quantized: float = 0.0
    kl_sum: float = 0.0
    kl_values: list[float] = field(default_factory=list)
    delta_p: list[float] = field(default_factory=list)  # p_quantized(correct token) - p_original(correct token)
    same_top: int = 0

    def add_window(self, original: np.ndarray, quantized: np.ndarray, window: list[int]) -> None:
        """Adds a window: ``original``/``quantized`` are logits (positions × vocab) over ``window``."""
        vocab = min(original.shape[1], quantized.shape[1])  # padded vocabularies may differ in size
        targets = np.asarray(window[1:])
        for start in range(0, len(targets), ROWS_PER_CHUNK):
            rows = slice(start, min(start + ROWS_PER_CHUNK, len(targets)))
            log_p = log_softmax(original[rows, :vocab])
            log_q = log_softmax(quantized[rows, :vocab])
            picked = np.arange(log_p.shape[0]), targets[rows]
            self.nll_original -= float(log_p[picked].sum())
            self.nll_quantized -= float(log_q[picked].sum())
            self.delta_p.extend((np.exp(log_q[picked]) - np.exp(log_p[picked])).tolist())
            kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
            self.kl_sum += float(kl.sum())
            self.kl_values.extend(kl.tolist())
            self.same_top += int((log_p.argmax(axis=-1) == log_q.argmax(axis=-1)).sum())
            self.positions += log_p.shape[0]

    @property
    def perplexity_original(self) -> float:
        return math.exp(self.nll_original / max(self.positions, 1))

    @property
    def perplexity_quantized(self) -> float:
        return math.exp(self.nll_quantized / max(self.positions, 1))

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / max(self.positions, 1)

    @property
    def kl_p99(self) -> float:
        return kld_stats(self.kl_values).p99

    def kld(self) -> KLDStats:
        """The KL divergence statistics of the positions added so far."""
        return kld_stats(self.kl_values)

    @property
    def delta_p_rms(self) -> float:
        """RMS of Δp, as a fraction (llama.cpp prints it ×100 as a percentage)."""
        return rms(self.delta_p)

    @property
    def same_top_rate(self) -> float:
        return self.same_top / max(self.positions, 1)


def relative_change(new: float, old: float) -> float:
    """(new - old) / old, e.g. 0.012 for a 1.2% higher perplexity."""
    return (new - old) / old if old else math.inf


def greedy_agreement(originals: list[list[int]], quantized: list[list[int]]) -> tuple[float, float]:
    """(token agreement, exact-match rate) of greedy continuations, prompt by prompt.

    Token agreement is the shared prefix length over the original's length, averaged over prompts:
    once two greedy decodes differ they see different histories, so later tokens are not compared.
    """
    if len(originals) != len(quantized):
        raise ValueError("greedy_agreement needs one continuation per prompt from each model")
    if not originals:
        return 1.0, 1.0
    rates, exact = [], 0
    for a, b in zip(originals, quantized, strict=True):
        shared = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            shared += 1
        rates.append(shared / len(a) if a else float(not b))
        exact += a == b
    return sum(rates) / len(rates), exact / len(originals)
