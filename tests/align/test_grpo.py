"""GRPO with LoRA on the tiny Llama, rewarded by the verifier and a reward model, weighted."""

from __future__ import annotations

import pytest
from conftest import chat_once, metric_values, state_dict_of, train_tiny


def test_grpo_combines_rewards_logs_kl_and_trains(tiny_llama, reward_run, tmp_path):
    run = train_tiny(
        "grpo", tiny_llama, tmp_path / "run", dataset="builtin:capitals_train", lora=True,
        rewards="verifier:1,reward_model:0.5", reward_model=str(reward_run.dir),
        batch_size=4, num_generations=2, max_completion_length=6, beta=0.04,
    )
    assert metric_values(run, "rewards/verifier/mean") and metric_values(run, "rewards/reward_model/mean")
    kl = metric_values(run, "kl")
    # GRPO's loss is ~0 by construction (group-normalised advantages, ratio 1), so the KL to the reference
    # shows the policy moved: 0 at step 1 (LoRA B starts at zero: policy == reference), positive after an update.
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4, f"kl {kl}"
    assert metric_values(run, "completions/mean_length")
    adapter = state_dict_of(run.final)
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())
    for plot in ("reward", "kl", "length"):
        assert (run.plots / f"{plot}.png").is_file()

    from tandemlm.align.merge import merge_run

    chat_once(merge_run(run.dir))
