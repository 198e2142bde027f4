"""Mixed precision per tensor: a ggml type for each group of tensors, chosen for the least KL divergence
at a target size (``tandem quantize MODEL --target-bpw B``).

llama.cpp's presets (Q4_K_M, ...) fix which tensors get more bits by rule. Here the rule is measured,
as Unsloth's dynamic quants and exllamav3's optimizer do:

1. **sensitivity** (:mod:`.sensitivity`): per group of tensors (kind × band of layers) and per
   candidate type (``f16`` included), the KL divergence it adds on calibration text with the rest at
   ``q8_0``; cached;
2. **assignment** (:func:`assign_types`): the least total ΔKLD whose bytes fit the budget, a
   multiple-choice knapsack solved exactly by dynamic programming over the spare bytes;
3. **search** (:mod:`.mixed_search`): the knapsack's plan and llama.cpp's uniform files that fit are
   quantized and scored on the calibration slice, and the best is improved by measured moves, each
   kept only when the file's measured KLD drops (the ΔKLDs stop adding up near the 8-bit floor);
4. **quantize**: the plan as llama.cpp's per-tensor type overrides (one exact-name regex per group),
   read back to check every tensor got its type, and the achieved bits per weight.

The budget is the whole file, ``target_bpw × weights / 8`` bytes, counted exactly: the header and the
tensors that stay unquantized (norms at f32) as in the all-``q8_0`` file, each grouped tensor at its
type padded to GGUF's 32-byte alignment; a uniform file fits its own size. The bench
(``bench/quantize_mixed.py``) checks the result on evaluation text never used for the measurement or search.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.cache import temp_folder
from tandemlm.quantize.imatrix import QuantizerImatrix, choose_imatrix, prepare_imatrix
from tandemlm.quantize.mixed_search import UNIFORM_STARTS, SearchResult, local_search, plan_bytes
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model
from tandemlm.quantize.quantizer import quantize_gguf
from tandemlm.quantize.sensitivity import (
    EVERY_TENSOR,
    Group,
    KLProbe,
    ProbeProgress,
    ProbeSettings,
    Sensitivity,
    measure_sensitivity,
    type_row,
)
from tandemlm.quantize.texts import Text

BINS = 20_000  # spare-byte resolution of the knapsack: sizes round up to 1/BINS of the spare bytes


@dataclass(frozen=True)
class Choice:
    """One way to store a group: a ggml type, the bytes it takes and the KL divergence it adds."""

    qtype: str
    n_bytes: int
    delta_kld: float


def assign_types(choices: Mapping[str, Sequence[Choice]], budget: int, bins: int = BINS) -> dict[str, Choice]:
    """The choice per group with the least total ΔKLD whose bytes sum to at most ``budget``.

    Exact dynamic programming over the bytes above the smallest assignment, counted in units of
    ``spare / bins`` rounded up (so the result never exceeds the budget). On a tie the larger type wins.
    """
    names = list(choices)
    floors = {name: min((c.n_bytes for c in choices[name]), default=-1) for name in names}
    if any(floor < 0 for floor in floors.values()):
        raise QuantizeError(f"group {next(n for n, f in floors.items() if f < 0)} has no candidate type")
    spare = budget - sum(floors.values())
    if spare < 0:
        raise QuantizeError(f"no choice of types fits {budget:,} bytes: the smallest takes {sum(floors.values()):,}")
    unit = max(1, math.ceil(spare / bins))
    cap = spare // unit
    best = np.zeros(cap + 1)  # best[b]: least ΔKLD of the groups so far within b units of spare bytes
    steps = []
    for name in names:
        options = sorted(choices[name], key=lambda c: -c.n_bytes)
        weights = [math.ceil((c.n_bytes - floors[name]) / unit) for c in options]
        cost, pick = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=np.int32)
        for index, (option, weight) in enumerate(zip(options, weights, strict=True)):
            if weight > cap:
                continue
            trial = np.full(cap + 1, np.inf)
            trial[weight:] = best[: cap + 1 - weight] + option.delta_kld
            better = trial < cost
            cost[better], pick[better] = trial[better], index
        best = cost
        steps.append((options, weights, pick))
    chosen, room = {}, cap
    for name, (options, weights, pick) in zip(reversed(names), reversed(steps), strict=True):
        index = int(pick[room])
        chosen[name], room = options[index], room - weights[index]
    return {name: chosen[name] for name in names}


@dataclass(frozen=True)
class MixedPlan:
    """A type per group, and what it is predicted to weigh and cost."""

    target_bpw: float
    high: str
    groups: tuple[Group, ...]
    types: dict[str, str]  # group name → ggml type (lower case)
    predicted_bytes: int
    predicted_delta_kld: float  # sum of the chosen types' ΔKLD on the calibration slice
    base_kld: float  # the all-high file's KLD on that slice
    n_params: int
    search: SearchResult | None = None  # the measured search that chose ``types`` (None: the knapsack's plan as is)

    @property
    def predicted_bpw(self) -> float:
        """Predicted whole-file bits per weight."""
        return self.predicted_bytes * 8 / max(self.n_params, 1)

    @property
    def predicted_kld(self) -> float:
        """Mean KLD on the calibration slice if the groups' errors add up: the all-high file's plus the ΔKLDs."""
        return self.base_kld + self.predicted_delta_kld

    def tensor_types(self) -> dict[str, str]:
        """llama.cpp's overrides: each group's exact names, then the high type for anything else it quantizes."""
        return {**{g.pattern(): self.types[g.name] for g in self.groups}, EVERY_TENSOR: self.high}

    def tensor_plan(self) -> dict[str, str]:
        """Tensor name → planned ggml type."""
        return {name: self.types[g.name] for g in self.groups for name in g.tensors}

    def shares(self) -> Counter[str]:
        """Weights per ggml type."""
        found: Counter[str] = Counter()
        for group in self.groups:
            found[self.types[group.name]] += group.elements
        return found

    def summary(self) -> str:
        """One line: the types' shares of the grouped weights, the predicted size and ΔKLD."""
        shares = self.shares()
        total = max(sum(shares.values()), 1)
        mix = ", ".join(f"{name} {count / total:.0%}" for name, count in shares.most_common())
        line = f"{mix} of the weights; {self.predicted_bpw:.3f} bits per weight (target {self.target_bpw:g}), "
        if self.search is None:
            return line + f"KLD {self.predicted_kld:.5f} on calibration text as the ΔKLDs add up"
        return line + f"KLD {self.search.kld:.5f} measured on calibration text ({self.search.describe()})"


def file_budget(sensitivity: Sensitivity, target_bpw: float) -> int:
    """Whole-file bytes of ``target_bpw`` bits per weight (a uniform file's own bits per weight gives its size)."""
    if not target_bpw > 0:
        raise QuantizeError(f"--target-bpw must be positive, got {target_bpw}")
    return math.floor(target_bpw * sensitivity.n_params / 8 + 1e-6)


def plan_mixed(sensitivity: Sensitivity, target_bpw: float) -> MixedPlan:
    """The types of least summed ΔKLD whose whole file fits ``target_bpw`` bits per weight (the knapsack, unmeasured)."""
    s = sensitivity
    budget = file_budget(s, target_bpw) - s.fixed_bytes
    # A negative ΔKLD is kept: the lower type is closer to the original than the high one (as for
    # weights that were dequantized from that type's grid), so it is chosen even with bytes to spare.
    choices = {g.name: [Choice(t, g.n_bytes(t), d) for t, d in s.delta_kld[g.name].items()] for g in s.groups}
    smallest = sum(min(c.n_bytes for c in options) for options in choices.values())
    if smallest > budget:
        raise QuantizeError(
            f"--target-bpw {target_bpw:g} is below the smallest mix of the candidate types: "
            f"{(s.fixed_bytes + smallest) * 8 / s.n_params:.3f} bits per weight with every tensor at its smallest type"
        )
    chosen = assign_types(choices, budget)
    types = {name: choice.qtype for name, choice in chosen.items()}
    predicted = s.fixed_bytes + sum(choice.n_bytes for choice in chosen.values())
    delta = sum(choice.delta_kld for choice in chosen.values())
    return MixedPlan(target_bpw, s.high, tuple(s.groups), types, predicted, delta, s.base_kld, s.n_params)


@dataclass
class MixedResult:
    """The written file, its plan and its measured size (and, through the pipeline, its float original)."""

    path: Path
    plan: MixedPlan
    file_bytes: int
    bits_per_weight: float
    intermediate: Path | None = None  # the f16/bf16 GGUF it was made from
    imatrix: str | None = None  # what the importance matrix was made from
    report: Any = None  # a QualityReport when the caller measured one

    @property
    def label(self) -> str:
        """How tables name it: ``mix 5.45 bpw``."""
        return f"mix {self.bits_per_weight:.2f} bpw"

    def fallback_line(self) -> str:
        """Nothing fell back: the read-back check refuses a file where any tensor did."""
        return ""

    def summary(self) -> str:
        """One line for the user: achieved size against the target, and the mix."""
        return f"{self.path.name}: {self.bits_per_weight:.3f} bits per weight ({self.file_bytes / 2**20:.1f} MiB); {self.plan.summary()}"


def quantize_mixed(
    source: Path, out: Path, target_bpw: float, entry: Path, calibration: Text, settings: ProbeSettings | None = None,
    imatrix: QuantizerImatrix | None = None, progress: ProbeProgress | None = None, temp_dir: Path | None = None,
) -> MixedResult:
    """Quantizes ``source`` (a float GGUF) to ``out`` with a type per group for ``target_bpw``.

    The sensitivity is measured on ``calibration`` (or read from ``entry``, where it is cached); the
    knapsack's plan is refined by ``settings.search`` measured moves (:func:`search_plan`); ``imatrix``
    serves the probes, the search and the result alike.
    """
    settings = settings or ProbeSettings()
    sensitivity = measure_sensitivity(source, entry, calibration, settings, imatrix, progress, temp_dir)
    plan = plan_mixed(sensitivity, target_bpw)
    if settings.search > 0:
        plan = search_plan(source, plan, sensitivity, calibration, settings, imatrix, progress, temp_dir)
    _write_plan(source, out, plan, settings, imatrix, temp_dir)
    info = read_gguf_info(out)
    planned = plan.tensor_plan()
    wrong = [t for t in info.tensors if t.name in planned and t.type_name.lower() != planned[t.name]]
    if wrong:
        out.unlink(missing_ok=True)
        first = wrong[0]
        raise QuantizeError(f"llama.cpp stored {first.name} as {first.type_name}, not the planned {planned[first.name]}")
    return MixedResult(out, plan, info.file_size, info.bits_per_weight)


def _write_plan(
    source: Path, out: Path, plan: MixedPlan, settings: ProbeSettings, imatrix: QuantizerImatrix | None, temp_dir: Path | None,
) -> None:
    dominant = plan.shares().most_common(1)[0][0]  # names the file type llama.cpp writes in the header
    quantize_gguf(source, out, type_row(dominant), nthread=settings.threads, imatrix=imatrix,
                  tensor_types=plan.tensor_types(), temp_dir=temp_dir)


def search_plan(
    source: Path, plan: MixedPlan, sensitivity: Sensitivity, calibration: Text, settings: ProbeSettings,
    imatrix: QuantizerImatrix | None = None, progress: ProbeProgress | None = None, temp_dir: Path | None = None,
) -> MixedPlan:
    """The knapsack's ``plan`` refined by measurement (:mod:`.mixed_search`): the best file measured on the
    calibration slice among it, llama.cpp's uniform files that fit, and ``settings.search`` moves from there."""
    budget = file_budget(sensitivity, plan.target_bpw)
    report = progress or (lambda *_: None)
    folder = temp_dir or temp_folder()
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-mixed-search.", dir=folder) as name:
        work = Path(name)
        starts = [("knapsack", plan.types)]
        for what, types in uniform_starts(source, work, sensitivity, budget, settings, imatrix):
            if types != plan.types:
                starts.append((what, types))
        total = len(starts) + settings.search
        probe = KLProbe(source, calibration, settings.tokens, settings.window, settings.threads, folder)
        done = [0]

        def measure(types: Mapping[str, str]) -> float:
            done[0] += 1
            report(done[0], total, f"search: mix {done[0]} on the calibration slice")
            path = work / "trial.gguf"
            _write_plan(source, path, replace(plan, types=dict(types)), settings, imatrix, work)
            kld = probe.agreement(path).kl_mean
            path.unlink()
            return kld

        try:
            found = local_search(sensitivity, budget, starts, measure, settings.search)
        finally:
            probe.close()
    delta = sum(sensitivity.delta_kld[name][qtype] for name, qtype in found.types.items())
    return replace(plan, types=found.types, predicted_bytes=plan_bytes(sensitivity, found.types), predicted_delta_kld=delta, search=found)


def uniform_starts(
    source: Path, work: Path, sensitivity: Sensitivity, budget: int, settings: ProbeSettings, imatrix: QuantizerImatrix | None,
) -> list[tuple[str, dict[str, str]]]:
    """llama.cpp's own files of the largest candidate types whose whole file fits ``budget`` bytes (at most
    :data:`UNIFORM_STARTS`), as group types read back from the file (types outside the candidates: skipped)."""
    s = sensitivity
    estimate = {t: plan_bytes(s, {g.name: t if t in s.delta_kld[g.name] else s.high for g in s.groups})
                for t in {t for delta in s.delta_kld.values() for t in delta}}
    found: list[tuple[str, dict[str, str]]] = []
    for qtype in sorted((t for t in estimate if estimate[t] <= budget), key=lambda t: -estimate[t])[: 2 * UNIFORM_STARTS]:
        path = work / "uniform.gguf"
        quantize_gguf(source, path, type_row(qtype), nthread=settings.threads, imatrix=imatrix, temp_dir=work)
        stored = {t.name: t.type_name.lower() for t in read_gguf_info(path).tensors}
        path.unlink()
        types = {g.name: stored[g.tensors[0]] for g in s.groups}
        same = all(stored[name] == types[g.name] for g in s.groups for name in g.tensors)
        if same and all(t in s.delta_kld[g] for g, t in types.items()) and plan_bytes(s, types) <= budget:
            found.append((f"uniform {qtype}", types))
        if len(found) == UNIFORM_STARTS:
            break
    return found


def quantize_model_mixed(config: QuantizeConfig, target_bpw: float, settings: ProbeSettings | None = None, console: Any = None) -> MixedResult:
    """The pipeline route for ``--target-bpw``: ``config`` gives the model, cache, importance matrix and calibration text; its type is ignored.

    The model is converted and quantized to the high type through the pipeline (verified, cached);
    the mix is made from its float intermediate, measured in its cache entry.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not config.use_cache:
        raise QuantizeError("--target-bpw keeps its sensitivity measurement in the cache: drop --no-cache")
    console = console or Console(stderr=True)
    settings = settings or ProbeSettings(threads=config.threads)
    base = quantize_model(replace(config, qtype=settings.high, publish=False, report=None), console)
    assert base.intermediate is not None
    entry = base.path.parent
    calibration = config.calibration_source()
    imatrix = prepare_imatrix(choose_imatrix(config.imatrix, calibration, config.calibration_chunks), base.intermediate, entry, config.threads)
    out = config.out or Path.cwd() / f"{Path(config.model).name.removesuffix('.gguf')}-mix-{target_bpw:g}bpw.gguf"
    columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    search = f"; the plan then refined by up to {settings.search} measured moves" if settings.search else ""
    console.print(f"per-tensor types for {target_bpw:g} bits per weight (sensitivity measured once, cached{search})")
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None)
        result = quantize_mixed(
            base.intermediate, out, target_bpw, entry, calibration, settings, imatrix,
            progress=lambda done, total, what: bar.update(task, completed=done, total=total, description=what),
        )
    console.print(f"[green]✓[/green] {result.summary()}")
    result.intermediate = base.intermediate
    result.imatrix = imatrix.source.describe() if imatrix is not None else None
    return result
