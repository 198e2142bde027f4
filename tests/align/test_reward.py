"""Reward model (Bradley-Terry) with LoRA on the tiny Llama: loss, head and adapter trained, eval, merge."""

from __future__ import annotations

from conftest import metric_values, state_dict_of


def test_reward_run_logs_accuracy_and_trains_head_and_adapter(reward_run):
    losses = metric_values(reward_run, "loss")  # both steps on the same 2 pairs (see the reward_run fixture)
    assert len(losses) == 2 and losses[-1] < losses[0] - 0.02, f"loss did not fall on a repeated batch: {losses}"
    assert metric_values(reward_run, "accuracy")
    adapter = state_dict_of(reward_run.final)
    assert any("score" in name for name in adapter)  # the new head is saved beside the adapter
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())


def test_reward_eval_and_merge(reward_run):
    from transformers import AutoModelForSequenceClassification

    from tandemlm.align.evaluate import EvalOptions, evaluate_run
    from tandemlm.align.merge import merge_run

    report = evaluate_run(reward_run.dir, EvalOptions(datasets=["builtin:prefs_test"], prompts=12, threads=1))
    assert report["pairs"]["n"] == 12 and 0.0 <= report["pairs"]["accuracy"] <= 1.0
    assert set(report["pairs"]["by_kind"]) <= {"wrong_capital", "refusal", "off_topic", "no_answer"}

    merged = merge_run(reward_run.dir)
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.num_labels == 1
