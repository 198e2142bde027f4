"""``bench/grpo_step.py`` configures TRL's ``GRPOTrainer`` as the algorithm it compares ours with.

The bench reads each algorithm's knobs from our config class and maps them onto ``GRPOConfig``; a slip there (or a
changed default on either side) would make the bench compare two different algorithms and still print ratios. No
model loads and nothing trains here (the bench itself never runs in the test suite).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
MODEL = "/unused"  # the configs only carry the folder's name

# algorithm -> (TRL loss_type, importance_sampling_level, epsilon, epsilon_high, beta)
INTENDED = {
    "grpo": ("grpo", "token", 0.2, 0.2, 0.04),
    "dapo": ("dapo", "token", 0.2, 0.28, 0.0),
    "gspo": ("grpo", "sequence", 3e-4, 4e-4, 0.0),
}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("grpo_step")


def settings(bench: ModuleType) -> dict:
    return {**bench.DEFAULTS, "model_dir": MODEL}


@pytest.mark.parametrize("algorithm", sorted(INTENDED))
def test_trl_config_is_our_algorithm_and_schedule(bench: ModuleType, algorithm: str, tmp_path: Path) -> None:
    s = settings(bench)
    ours = bench.our_config(algorithm, s)
    trl = bench.trl_grpo_config(ours, s, str(tmp_path))
    loss_type, level, low, high, beta = INTENDED[algorithm]
    assert (trl.loss_type, trl.importance_sampling_level, trl.beta) == (loss_type, level, beta)
    assert trl.epsilon == pytest.approx(low) and trl.epsilon_high == pytest.approx(high)
    assert trl.use_bias_correction_kl is False  # TRL's default weighs k3 by the ratio; ours (and the paper) do not
    # ...and ours runs the same knobs
    assert (ours.cliprange, ours.upper_clip, ours.beta) == pytest.approx((low, high, beta))
    assert ours.policy_loss == ("sequence" if level == "sequence" else "token-clip")
    assert ours.loss_aggregation == ("token-mean" if loss_type == "dapo" else "seq-mean-token-mean")
    assert ours.advantage == "group" and ours.advantage_scale == "std" and trl.scale_rewards == "group"
    assert not ours.dynamic_sampling  # TRL has none
    # One generation batch of the same completions = one optimizer step over all of it, on both sides.
    assert trl.per_device_train_batch_size == trl.generation_batch_size == ours.batch_size == ours.rows_per_minibatch
    assert trl.gradient_accumulation_steps == trl.steps_per_generation == trl.num_iterations == ours.num_iterations == 1
    assert ours.grad_accum == 1 and trl.num_generations == ours.num_generations
    assert trl.max_completion_length == ours.max_completion_length
    assert trl.temperature == ours.temperature == 1.0 and trl.top_k == ours.top_k == 0 and trl.top_p == 1.0
    assert not (trl.use_vllm or trl.gradient_checkpointing or ours.gradient_checkpointing)
    assert trl.max_steps == ours.max_steps == s["warmup"] + s["steps"]


def test_dapo_gets_the_same_overlong_shaping_on_both_sides(bench: ModuleType) -> None:
    from tandemlm.align.ppo.maths import overlong_penalty

    s = settings(bench)
    dapo = bench.our_config("dapo", s)
    assert dapo.overlong_tokens == s["max_completion_length"] // 4  # DAPO's default: a quarter of the length
    funcs = bench.trl_reward_funcs(dapo)
    assert bench.trl_grpo_kwargs(dapo, s, "/unused", False)["reward_weights"] == [1.0, dapo.overlong_penalty]
    lengths = list(range(2 * s["max_completion_length"]))
    theirs = funcs[1]([[7] * n for n in lengths])
    ours = overlong_penalty(torch.tensor(lengths), dapo.max_completion_length, dapo.overlong_tokens)
    assert theirs == pytest.approx(ours.tolist()) and min(theirs) == -1.0 and max(theirs) == 0.0
    for algorithm in ("grpo", "gspo"):  # no shaping: the one reward, on both sides
        other = bench.our_config(algorithm, s)
        assert other.overlong_tokens == 0 and len(bench.trl_reward_funcs(other)) == 1
    # The shared reward reads TRL's conversational completions as ours reads its texts.
    texts = ["Paris.", "The capital is Kabul, Kabul."]
    assert funcs[0]([[]] * 2, [[{"role": "assistant", "content": t}] for t in texts]) == bench.distinct_share(texts)


def test_a_knob_trl_cannot_express_is_refused(bench: ModuleType) -> None:
    from tandemlm.align.ppo.group_config import DAPORunConfig, DCPORunConfig

    s = settings(bench)
    common = {"model": MODEL, "batch_size": 8, "num_generations": 4, "lora": True}
    with pytest.raises(ValueError, match="advantage"):
        bench.trl_grpo_kwargs(DCPORunConfig(**common), s, "/unused", False)
    with pytest.raises(ValueError, match="dynamic_sampling"):
        bench.trl_grpo_kwargs(DAPORunConfig(**common), s, "/unused", False)


def test_the_table_shows_ratios_with_the_issues_targets_and_a_failed_side_as_dashes(bench: ModuleType) -> None:
    ours = {"rollout_s_per_sample": 0.3, "update_s_per_sample": 0.2, "seconds_per_sample": 0.5, "peak_rss_mb": 1400.0,
            "mean_completion_length": 20.0}
    theirs = {**ours, "seconds_per_sample": 1.0, "peak_rss_mb": 2000.0}
    rows = {r[0]: r for r in bench.comparison_rows(ours, theirs, cuda=False)}
    assert rows["rollout + update (s/sample)"][3:] == ("0.50", "<= 1.00 (met)")
    assert rows["peak RSS (MiB)"][3:] == ("0.70", "<= 0.60 (missed)")
    assert rows["update (s/sample)"][3:] == ("1.00", "") and not any("CUDA" in label for label in rows)
    failed = bench.comparison_rows(ours, {"error": "exit 1: boom"}, cuda=False)
    assert all(r[2] == "-" and r[3] == "-" for r in failed)
    assert "ours/TRL" in bench.format_table(failed).splitlines()[0]
