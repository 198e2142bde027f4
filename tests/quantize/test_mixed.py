"""Mixed precision per tensor: the assignment on hand-made sensitivities (least ΔKLD, within budget,
filled, refused when impossible), the measured search on a made-up KLD (never worse than its starts,
within budget, kept only what measures better), and a real measurement on the tiny llama that the
written file follows, sized exactly (a uniform file fits its own size)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.mixed import (
    Choice,
    assign_types,
    file_budget,
    plan_mixed,
    quantize_mixed,
    quantize_model_mixed,
    uniform_starts,
)
from tandemlm.quantize.mixed_search import local_search, plan_bytes, ranked_moves
from tandemlm.quantize.pipeline import QuantizeConfig
from tandemlm.quantize.quantizer import quantize_gguf
from tandemlm.quantize.sensitivity import (
    CANDIDATES,
    Group,
    ProbeSettings,
    Sensitivity,
    measure_sensitivity,
    type_row,
)
from tandemlm.quantize.texts import Text, builtin_calibration
from tandemlm.testing.tiny_models import fixture_gguf

LOW, HIGH = "q4_0", "q8_0"


def _two_types(deltas: dict[str, float], size: int = 100) -> dict[str, list[Choice]]:
    """Groups of one size: the high type adds nothing and takes twice the bytes of the low one."""
    return {name: [Choice(HIGH, 2 * size, 0.0), Choice(LOW, size, delta)] for name, delta in deltas.items()}


def _brute_force(choices: dict[str, list[Choice]], budget: int) -> float:
    """The least total ΔKLD of any assignment within ``budget``, by trying them all."""
    best = math.inf
    for combo in itertools.product(*choices.values()):
        if sum(c.n_bytes for c in combo) <= budget:
            best = min(best, sum(c.delta_kld for c in combo))
    return best


def test_the_most_sensitive_groups_keep_the_higher_type() -> None:
    choices = _two_types({"attn_q": 0.1, "ffn_down": 0.3, "attn_v": 0.2})
    one_upgrade = assign_types(choices, budget=400)
    assert {name: c.qtype for name, c in one_upgrade.items()} == {"attn_q": LOW, "ffn_down": HIGH, "attn_v": LOW}
    two_upgrades = assign_types(choices, budget=500)
    assert {name: c.qtype for name, c in two_upgrades.items()} == {"attn_q": LOW, "ffn_down": HIGH, "attn_v": HIGH}
    assert {c.qtype for c in assign_types(choices, budget=600).values()} == {HIGH}


@pytest.mark.parametrize("scale", [1, 10_007])  # bytes: exact units, and units coarser than a byte
def test_the_assignment_is_the_least_dkld_within_the_budget_and_fills_it(scale: int) -> None:
    rng = random.Random(scale)
    for _ in range(60):
        choices = {}
        for group in range(rng.randint(1, 5)):
            size = rng.randint(10, 200) * scale
            options = [Choice(HIGH, 2 * size, 0.0)] + [
                Choice(name, int(size * bits / 8.5), rng.uniform(-0.005, 0.02)) for name, bits in (("q5_0", 5.5), (LOW, 4.5))
            ]
            choices[f"g{group}"] = options
        smallest = sum(min(c.n_bytes for c in options) for options in choices.values())
        largest = sum(max(c.n_bytes for c in options) for options in choices.values())
        budget = rng.randint(smallest, largest)
        chosen = assign_types(choices, budget)
        used = sum(c.n_bytes for c in chosen.values())
        assert used <= budget
        total = sum(c.delta_kld for c in chosen.values())
        assert total == pytest.approx(_brute_force(choices, budget), abs=1e-12 if scale == 1 else 0.02)
        if scale == 1:  # filled: no group could take a better type in the bytes left over
            for name, options in choices.items():
                for option in options:
                    fits = used - chosen[name].n_bytes + option.n_bytes <= budget
                    assert not (fits and option.delta_kld < chosen[name].delta_kld)


def test_a_lower_type_closer_to_the_original_is_chosen_even_with_bytes_to_spare() -> None:
    """Weights dequantized from q4_1 (the built-in model's) come back exactly at q4_1, not at q8_0."""
    groups = [Group(f"ffn_up.weight blk {i}-{i}", (f"blk.{i}.ffn_up.weight",), 1 << 16, 576) for i in range(2)]
    delta = {groups[0].name: {HIGH: 0.0, "q4_1": -0.001}, groups[1].name: {HIGH: 0.0, "q4_1": 0.002}}
    plan = plan_mixed(Sensitivity(HIGH, groups, delta, 0.004, 4096, 1 << 17, 2, 512), 9.0)
    assert plan.types == {groups[0].name: "q4_1", groups[1].name: HIGH}
    assert plan.predicted_kld == pytest.approx(0.003)


def test_an_impossible_budget_is_refused_in_one_line() -> None:
    choices = _two_types({"attn_q": 0.1, "ffn_down": 0.3})
    with pytest.raises(QuantizeError, match=r"no choice of types fits 199 bytes: the smallest takes 200") as info:
        assign_types(choices, budget=199)
    assert "\n" not in str(info.value)
    group = Group("ffn_down.weight blk 0-0", ("blk.0.ffn_down.weight",), 1 << 20, 1536)
    sensitivity = Sensitivity(HIGH, [group], {group.name: {HIGH: 0.0, LOW: 0.01}}, 0.0, 4096, 1 << 20, 1, 512)
    with pytest.raises(QuantizeError, match=r"--target-bpw 4 is below the smallest mix .*: 4\.53\d bits per weight") as info:
        plan_mixed(sensitivity, 4.0)
    assert "\n" not in str(info.value)


def test_types_whose_blocks_do_not_divide_the_rows_are_not_candidates() -> None:
    rows_576 = Group("attn_q.weight blk 0-4", ("blk.0.attn_q.weight",), 576 * 576, 576)
    assert rows_576.fits("q8_0") and rows_576.fits("iq4_nl") and rows_576.fits("q4_1")
    assert not rows_576.fits("q4_k") and not rows_576.fits("q6_k")
    assert Group("ffn_down.weight blk 0-4", ("blk.0.ffn_down.weight",), 1536 * 576, 1536).fits("q6_k")


def test_every_candidate_type_has_a_file_type_for_the_quantizer() -> None:
    import llama_cpp

    assert type_row("q4_1").ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1  # no row of its own in QUANT_TYPES
    assert type_row("q4_k").block == "Q4_K" and type_row("q8_0").name == "q8_0"
    for name in CANDIDATES:
        assert type_row(name).block == name.upper()
    with pytest.raises(QuantizeError, match="unknown quant type 'q9_9'"):
        type_row("q9_9")


def _four_groups(predicted: list[float]) -> Sensitivity:
    """Four one-tensor groups of one size, ``LOW`` predicted to add ``predicted[i]`` to group i."""
    groups = [Group(f"g{i}", (f"blk.{i}.ffn_up.weight",), 1 << 12, 256) for i in range(4)]
    delta = {g.name: {HIGH: 0.0, LOW: d} for g, d in zip(groups, predicted, strict=True)}
    return Sensitivity(HIGH, groups, delta, 0.001, 1000, 1 << 14, 6, 512)


def test_the_search_keeps_only_moves_that_measure_better_and_stays_within_budget() -> None:
    """The ΔKLDs rank g3 the most sensitive; the files say g0 is and g3 hardly is: the files win."""
    sensitivity = _four_groups([0.01, 0.02, 0.03, 0.04])
    truth = {"g0": 0.05, "g1": 0.02, "g2": 0.03, "g3": 0.001}

    def measure(types: dict[str, str]) -> float:
        return 0.001 + sum(truth[name] for name, qtype in types.items() if qtype == LOW)

    groups = sensitivity.groups
    budget = sensitivity.fixed_bytes + 2 * groups[0].n_bytes(HIGH) + 2 * groups[0].n_bytes(LOW)  # two groups at HIGH
    knapsack = {"g0": LOW, "g1": LOW, "g2": HIGH, "g3": HIGH}
    found = local_search(sensitivity, budget, [("knapsack", knapsack), ("uniform q4_0", dict.fromkeys(truth, LOW))], measure, 6)
    assert found.types == {"g0": HIGH, "g1": LOW, "g2": HIGH, "g3": LOW} and found.kld == pytest.approx(0.022)
    assert found.start == "knapsack" and found.starts == 2 and found.kept >= 1
    assert all(plan_bytes(sensitivity, t.types) <= budget for t in found.trials)
    kept = [t.kld for t in found.trials if t.kept]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept)  # each kept move measured lower
    # The move the ΔKLDs rank first (g1 up, g2 down) was measured, found worse, and not kept.
    first = next(t for t in found.trials[found.starts:])
    assert first.types == {"g0": LOW, "g1": HIGH, "g2": LOW, "g3": HIGH} and not first.kept
    assert len({frozenset(t.types.items()) for t in found.trials}) == len(found.trials)  # nothing measured twice


def test_the_search_never_ends_worse_than_its_best_start() -> None:
    rng = random.Random(7)
    for _ in range(40):
        sensitivity = _four_groups([rng.uniform(-0.002, 0.02) for _ in range(4)])
        noise = {g.name: rng.uniform(-0.01, 0.01) for g in sensitivity.groups}
        pair = rng.uniform(-0.01, 0.01)  # the groups' errors do not add up

        def measure(types: dict[str, str], s: Sensitivity = sensitivity, noise: dict[str, float] = noise, pair: float = pair) -> float:
            low = [n for n, t in types.items() if t == LOW]
            added = sum(s.delta_kld[n][LOW] + noise[n] for n in low)
            return 0.05 + added + (pair if {"g0", "g1"} <= set(low) else 0.0)

        budget = sensitivity.fixed_bytes + sum(g.n_bytes(LOW) for g in sensitivity.groups) + rng.randint(0, 3) * 2048
        uniform = {g.name: LOW for g in sensitivity.groups}
        found = local_search(sensitivity, budget, [("uniform q4_0", uniform)], measure, rng.randint(0, 6))
        assert found.kld <= measure(uniform) and found.kld == min(t.kld for t in found.trials)
        assert found.kld == measure(found.types) and plan_bytes(sensitivity, found.types) <= budget
        for _gain, change in ranked_moves(sensitivity, found.types, budget):
            assert plan_bytes(sensitivity, {**found.types, **change}) <= budget
    with pytest.raises(ValueError, match="does not fit"):
        local_search(sensitivity, sensitivity.fixed_bytes, [("uniform q4_0", uniform)], measure, 1)


# ---------------------------------------------------------------------------------------------
# A real measurement on the tiny llama (2 layers, rows of 256 and 512; f32 GGUF)


@pytest.fixture(scope="module")
def calibration() -> Text:
    return Text("first lines of the calibration text", builtin_calibration().content[:4000])


@pytest.fixture(scope="module")
def settings() -> ProbeSettings:
    return ProbeSettings(candidates=(HIGH, LOW), layers_per_group=2, tokens=128, window=64, threads=2)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, calibration: Text, settings: ProbeSettings) -> tuple[Sensitivity, Path]:
    entry = tmp_path_factory.mktemp("mixed-entry")
    return measure_sensitivity(fixture_gguf("llama"), entry, calibration, settings, temp_dir=entry), entry


def test_every_matrix_is_measured_once_at_every_candidate_and_the_measurement_is_cached(
    measured: tuple[Sensitivity, Path], calibration: Text, settings: ProbeSettings,
) -> None:
    sensitivity, entry = measured
    matrices = {t.name for t in read_gguf_info(fixture_gguf("llama")).tensors if len(t.shape) >= 2}
    grouped = [name for group in sensitivity.groups for name in group.tensors]
    assert sorted(grouped) == sorted(matrices)
    assert {g.name for g in sensitivity.groups} >= {"token_embd.weight", "ffn_down.weight blk 0-1", "attn_v.weight blk 0-1"}
    for group in sensitivity.groups:
        assert set(sensitivity.delta_kld[group.name]) == {HIGH, LOW}
        assert sensitivity.delta_kld[group.name][LOW] > 0  # 4 bits cost something everywhere
    assert sensitivity.tokens == 128 and sensitivity.base_kld > 0
    probes: list[str] = []
    again = measure_sensitivity(fixture_gguf("llama"), entry, calibration, settings, progress=lambda *a: probes.append(a[2]))
    assert again == sensitivity and probes == []


def test_the_written_mix_follows_the_measured_sensitivity_within_budget(
    measured: tuple[Sensitivity, Path], calibration: Text, settings: ProbeSettings, tmp_path: Path,
) -> None:
    sensitivity, entry = measured
    layers = [g for g in sensitivity.groups if g.name != "token_embd.weight"]
    low_bytes = sum(g.n_bytes(LOW) for g in sensitivity.groups)
    upgrades = sum(g.n_bytes(HIGH) - g.n_bytes(LOW) for g in layers)
    overhead = sensitivity.fixed_bytes
    target = (overhead + low_bytes + upgrades // 2) * 8 / sensitivity.n_params  # half the layers' upgrades fit
    source = fixture_gguf("llama")
    knapsack_only = replace(settings, search=0)
    result = quantize_mixed(source, tmp_path / "mix.gguf", target, entry, calibration, knapsack_only, temp_dir=tmp_path)
    assert result.plan.groups == tuple(sensitivity.groups)  # the cached measurement, not a new one
    plan = result.plan
    # The measured ranking: the group that loses most per byte at 4 bits keeps 8 bits, and of two groups
    # of one size the more sensitive never has 4 bits while the other has 8 (swapping them would be better).
    per_byte = sorted(layers, key=lambda g: sensitivity.delta_kld[g.name][LOW] / g.elements)
    assert plan.types[per_byte[-1].name] == HIGH
    for a, b in itertools.permutations(sensitivity.groups, 2):
        if a.elements == b.elements and sensitivity.delta_kld[a.name][LOW] > sensitivity.delta_kld[b.name][LOW]:
            assert (plan.types[a.name], plan.types[b.name]) != (LOW, HIGH), (a.name, b.name)
    assert plan.types["token_embd.weight"] == LOW  # its upgrade alone is larger than the budget allows
    assert sum(t == HIGH for t in plan.types.values()) >= 3 and sum(t == LOW for t in plan.types.values()) >= 3
    # The least total ΔKLD of every assignment that fits (2 types ^ 8 groups, tried one by one).
    choices = {g.name: [Choice(t, g.n_bytes(t), d) for t, d in sensitivity.delta_kld[g.name].items()]
               for g in sensitivity.groups}
    budget = math.floor(target * sensitivity.n_params / 8) - overhead
    assert plan.predicted_delta_kld == pytest.approx(_brute_force(choices, budget), rel=1e-3)
    # What was written: every tensor at its planned type, the whole file within the target size.
    info = read_gguf_info(result.path)
    assert {t.name: t.type_name.lower() for t in info.tensors if t.name in plan.tensor_plan()} == plan.tensor_plan()
    assert info.file_size <= target * info.n_params / 8
    assert info.file_size == result.file_bytes == plan.predicted_bytes  # sized exactly, padding included
    assert result.plan.search is None


def test_the_pipeline_route_measures_in_the_model_cache_entry(
    quant_cache: Path, tmp_path: Path, calibration: Text, settings: ProbeSettings,
) -> None:
    config = QuantizeConfig(model=str(fixture_gguf("llama")), qtype=HIGH, out=tmp_path / "route.gguf", cache_root=quant_cache,
                            imatrix="none", calibration_text=calibration)
    result = quantize_model_mixed(config, 6.0, replace(settings, tokens=64))
    assert result.path == tmp_path / "route.gguf" and result.bits_per_weight <= 6.0
    assert len(list(quant_cache.glob("*/mixed-sensitivity-*.json"))) == 1
    with pytest.raises(QuantizeError, match="drop --no-cache"):
        quantize_model_mixed(QuantizeConfig(model=config.model, qtype=HIGH, use_cache=False), 6.0)


def test_a_uniform_file_fits_its_own_size_and_the_search_never_ends_worse_than_it(
    measured: tuple[Sensitivity, Path], calibration: Text, settings: ProbeSettings, tmp_path: Path,
) -> None:
    source = fixture_gguf("llama")
    _, entry = measured
    with_q6 = replace(settings, candidates=(HIGH, "q6_k", LOW), search=2)  # llama.cpp's Q4_0 keeps token_embd at q6_k
    sensitivity = measure_sensitivity(source, entry, calibration, with_q6)  # only the q6_k probes are new
    assert all(set(d) == {HIGH, "q6_k", LOW} for d in sensitivity.delta_kld.values())
    uniform = tmp_path / "q4_0.gguf"
    quantize_gguf(source, uniform, type_row(LOW), nthread=2)
    info = read_gguf_info(uniform)
    stored = {t.name: t.type_name.lower() for t in info.tensors}
    types = {g.name: stored[g.tensors[0]] for g in sensitivity.groups}
    assert plan_bytes(sensitivity, types) == info.file_size == file_budget(sensitivity, info.bits_per_weight)
    assert ("uniform q4_0", types) in uniform_starts(source, tmp_path, sensitivity, info.file_size, with_q6, None)
    result = quantize_mixed(source, tmp_path / "mix.gguf", info.bits_per_weight, entry, calibration, with_q6, temp_dir=tmp_path)
    search = result.plan.search
    assert search is not None and result.file_bytes <= info.file_size
    starts = {t.what: t.kld for t in search.trials[: search.starts]}
    assert set(starts) >= {"knapsack", "uniform q4_0"} and search.kld <= min(starts.values())
    assert result.plan.types == search.types and "measured on calibration text" in result.plan.summary()
