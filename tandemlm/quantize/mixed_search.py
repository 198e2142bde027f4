"""A mix's plan refined by measurement: a local search on the calibration slice, never worse than where it starts.

The knapsack (:func:`tandemlm.quantize.mixed.assign_types`) sums ΔKLDs measured one group at a time against
the all-``q8_0`` file. Near the KLD floor (the error of rounding the activations to 8 bits, which every
quantized type pays) those sums stop predicting the file: the groups' errors do not add up, and the
differences are as small as the probes' noise. So the plan is checked and improved with real files:

1. **starts**: the knapsack's plan, and llama.cpp's own file of each of the largest uniform types that fits
   the budget (its per-tensor types read back: Q4_1 keeps ``token_embd`` at q8_0), each quantized and
   scored on the calibration slice; the best measured one is the current plan;
2. **moves**: one group to a type the ΔKLDs predict better, or that paid for by another group's smaller
   type, within the budget, ranked by the predicted gain; the best untried is quantized and scored, and
   kept only when its measured KLD is lower than the current plan's; repeated ``steps`` times.

The result is the best file measured: no worse on the calibration slice than the uniform types tried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tandemlm.quantize.sensitivity import Sensitivity

Measure = Callable[[Mapping[str, str]], float]  # group name → ggml type: the file's mean KLD on the calibration slice
UNIFORM_STARTS = 2  # uniform types measured as starts: the largest that fit


@dataclass(frozen=True)
class Trial:
    """One measured file: what it was, its types and its KLD, and whether the search kept it."""

    what: str  # "knapsack", "uniform q4_1", or the change: "attn_v.weight blk 0-4 → f16"
    types: dict[str, str]
    kld: float
    kept: bool


@dataclass(frozen=True)
class SearchResult:
    """The best plan measured, and every file measured on the way."""

    types: dict[str, str]
    kld: float
    start: str  # the start it grew from
    trials: tuple[Trial, ...]  # the starts, then the moves
    starts: int

    @property
    def kept(self) -> int:
        """Moves kept after the start."""
        return sum(t.kept for t in self.trials[self.starts:])

    def describe(self) -> str:
        """How the plan was found, in a few words."""
        return f"from {self.start}, {self.kept} of {len(self.trials) - self.starts} measured moves kept"


def plan_bytes(sensitivity: Sensitivity, types: Mapping[str, str]) -> int:
    """Whole-file bytes of ``types`` (group name → type): the fixed part and each group's padded tensors."""
    return sensitivity.fixed_bytes + sum(g.n_bytes(types[g.name]) for g in sensitivity.groups)


def ranked_moves(sensitivity: Sensitivity, types: Mapping[str, str], budget: int) -> list[tuple[float, dict[str, str]]]:
    """Changes of ``types`` that fit ``budget`` whole-file bytes, by the gain the ΔKLDs predict, best first: one
    group to a type predicted better, or one group to a type predicted better paid for by another group's
    smaller type (kept even when predicted to lose overall: near the floor the prediction is what is in doubt)."""
    used = plan_bytes(sensitivity, types)
    singles = []  # (predicted gain, extra bytes, group, type)
    for group in sensitivity.groups:
        delta, now = sensitivity.delta_kld[group.name], types[group.name]
        for qtype, value in delta.items():
            if qtype != now:
                singles.append((delta[now] - value, group.n_bytes(qtype) - group.n_bytes(now), group.name, qtype))
    found = [(gain, {name: qtype}) for gain, extra, name, qtype in singles if gain > 0 and used + extra <= budget]
    ups = [s for s in singles if s[0] > 0]
    downs = [s for s in singles if s[1] < 0]
    for up_gain, up_bytes, up_name, up_type in ups:
        for down_gain, down_bytes, down_name, down_type in downs:
            if down_name != up_name and used + up_bytes + down_bytes <= budget:
                found.append((up_gain + down_gain, {up_name: up_type, down_name: down_type}))
    return sorted(found, key=lambda move: -move[0])


def local_search(
    sensitivity: Sensitivity, budget: int, starts: list[tuple[str, dict[str, str]]], measure: Measure, steps: int,
) -> SearchResult:
    """From the best measured of ``starts`` (each within ``budget``), up to ``steps`` measured moves, each
    kept only when it lowers the measured KLD (see the module docstring)."""
    trials = []
    for what, types in starts:
        if plan_bytes(sensitivity, types) > budget:
            raise ValueError(f"the start {what} does not fit the budget")
        trials.append(Trial(what, dict(types), measure(types), False))
    if not trials:
        raise ValueError("local_search needs a start")
    best = min(trials, key=lambda t: t.kld)
    trials[trials.index(best)] = best = Trial(best.what, best.types, best.kld, True)
    tried = {frozenset(t.types.items()) for t in trials}
    for _ in range(steps):
        change = next((c for _, c in ranked_moves(sensitivity, best.types, budget)
                       if frozenset({**best.types, **c}.items()) not in tried), None)
        if change is None:
            break
        types = {**best.types, **change}
        tried.add(frozenset(types.items()))
        trial = Trial(", ".join(f"{name} → {qtype}" for name, qtype in change.items()), types, measure(types), False)
        if trial.kld < best.kld:
            trial = best = Trial(trial.what, types, trial.kld, True)
        trials.append(trial)
    start = next(t.what for t in trials if t.kept)
    return SearchResult(best.types, best.kld, start, tuple(trials), len(starts))
