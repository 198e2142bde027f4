"""DPO with LoRA on the tiny Llama (reference = adapter disabled), then eval, merge, chat and GGUF."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import chat_once, metric_values, one_batch, state_dict_of, train_tiny


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    data = one_batch("builtin:prefs_train", 2, out / "data")  # batch_size 2: every step trains on these 2 pairs
    return train_tiny("dpo", tiny_llama, out / "run", dataset=data, eval_dataset="builtin:prefs_test", lora=True, max_steps=3)


def test_dpo_logs_margins_and_trains_the_adapter(dpo_run):
    losses, margins = metric_values(dpo_run, "loss"), metric_values(dpo_run, "rewards/margins")
    # Step 1: LoRA B is zero, so policy == reference: margin 0 and loss -log sigmoid(0) = ln 2.
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert len(margins) == 3 and margins[0] == pytest.approx(0.0, abs=1e-4)
    assert losses[-1] < losses[0] - 0.05 and margins[-1] > 0.05, f"loss {losses}, margins {margins} on a repeated batch"
    adapter = state_dict_of(dpo_run.final)
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero: non-zero means it trained
    assert dpo_run.is_adapter and (dpo_run.plots / "margins.png").is_file()


def test_eval_reports_policy_vs_reference(dpo_run, reward_run):
    from tandemlm.align.evaluate import EvalOptions, evaluate_run

    options = EvalOptions(
        datasets=["builtin:capitals_test", "builtin:prefs_test"], reward_model=str(reward_run.dir),
        prompts=4, max_new_tokens=6, threads=1,
    )
    report = evaluate_run(dpo_run.dir, options)
    assert set(report["policy"]) == {"mean_length", "verifier_accuracy", "reward_model_score"}
    assert set(report["win_rate"]) == {"verifier", "reward_model"}
    assert sum(report["win_rate"]["reward_model"][k] for k in ("wins", "ties", "losses")) == 4
    assert report["pairs"]["n"] == 4 and 0.0 <= report["pairs"]["accuracy"] <= 1.0
    assert math.isfinite(report["kl"]["per_token"]) and report["kl"]["note"] is None  # sampled at temperature 1
    assert len(report["examples"]) == 3 and json.loads((dpo_run.dir / "eval.json").read_text()) == report


def test_merge_then_chat_and_convert_to_gguf(dpo_run, tmp_path):
    from tandemlm.align.merge import merge_run

    merged = merge_run(dpo_run.dir)
    assert merged == dpo_run.merged and (merged / "model.safetensors").is_file()
    base = state_dict_of(dpo_run.base_model)
    after = state_dict_of(merged)
    assert set(after) == set(base)  # no adapter names left: a plain checkpoint
    assert any(not torch.equal(base[k], after[k]) for k in base)
    chat_once(merged)

    from tandemlm.quantize import llamacpp_tools

    # A converter error fails the test: set-up fetches llama.cpp's sources, so a missing converter is a broken set-up.
    gguf = llamacpp_tools.convert_hf_to_gguf(merged, tmp_path / "merged.gguf", outtype="f16")
    assert gguf.stat().st_size > 1_000_000
