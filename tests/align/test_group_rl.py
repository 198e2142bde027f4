"""The critic-free algorithms (GRPO, DAPO, GSPO, DCPO) on our RL trainer: they train and log on the built-in
model, micro-batching keeps each algorithm's loss exact, DAPO drops all-equal groups and samples more, and a
run killed with -9 resumes to the same metrics and weights (DCPO: its per-prompt statistics included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import changed_tensors, kill_at_first_checkpoint, metric_values, state_dict_of, train_tiny

from tandemlm.align.metrics import read_metrics

ALGORITHMS = ("grpo", "dapo", "gspo", "dcpo")
# 2 prompts x 2 samples per step, two minibatches (the second is off-policy, so the clips act), 6 tokens.
GROUP_TINY: dict[str, Any] = {
    "dataset": "builtin:capitals_train", "lora": True, "batch_size": 4, "num_generations": 2, "minibatch_size": 2,
    "max_completion_length": 6, "max_length": 96,
}
# What issue 21 asks every algorithm to log.
GROUP_METRICS = (
    "score", "kl", "entropy", "completions/mean_length", "response_utilization", "clipfrac", "groups_dropped",
    "groups_resampled", "samples", "samples_per_s", "peak_memory_mb", "policy_loss", "actor_grad_norm",
)
REPRODUCIBLE = ("score", "kl", "policy_loss", "entropy", "clipfrac", "response_utilization", "completions/mean_length")


def text_score(call: int, responses: list[str]) -> list[float]:
    """A score per distinct text (a checksum): two different responses all but never tie."""
    return [zlib.crc32(r.encode()) % 1000 / 1000 for r in responses]


@pytest.mark.parametrize("method", ALGORITHMS)
def test_each_algorithm_trains_on_the_builtin_model_and_logs_the_metrics(method, tmp_path, score_server):
    url = score_server(text_score)
    run = train_tiny(method, "smollm2", tmp_path / "run", **GROUP_TINY, lora_layers=1, rewards="http", reward_url=url)
    records = [r for r in read_metrics(run.metrics) if "score" in r]
    assert [r["step"] for r in records] == [1, 2]
    for key in (*GROUP_METRICS, "rewards/http/mean"):
        assert key in records[-1], key
    assert [r["samples"] for r in records] == [4.0, 8.0]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[1]["kl"] != 0.0  # fresh adapter, then moved
    assert records[0]["response_utilization"] == 1.0  # distinct texts: every response has an advantage
    assert ("kl_loss" in records[-1]) == (method == "grpo")  # only GRPO puts the KL inside its loss by default
    assert not (run.final / "critic").exists()  # no critic, no value head
    for plot in ("reward", "kl", "utilization", "groups", "ppo_update"):
        assert (run.plots / f"{plot}.png").is_file(), plot
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state_dict_of(run.final).items())


@pytest.mark.parametrize("method", ALGORITHMS)
def test_micro_batches_sum_to_the_minibatch_loss(method, tiny_llama, tmp_path, score_server, monkeypatch):
    """grad_accum 2 gives the gradient and loss of grad_accum 1: each algorithm's aggregation stays exact.

    Compared: the gradient norm before clipping and the loss (Adam's first step is blind to a gradient's scale, so
    the weights alone would not show a wrongly weighted micro-batch). A sixth of the vocabulary ends a response,
    so rows have different lengths and a token share differs from a row share.
    """
    from tandemlm.align.ppo import rollout

    monkeypatch.setattr(rollout, "eos_ids", lambda model, tokenizer: list(range(8000)))
    url = score_server(text_score)
    runs = []
    for accum in (1, 2):
        values = {**GROUP_TINY, "batch_size": 8, "minibatch_size": 4, "max_steps": 1, "grad_accum": accum}
        runs.append(train_tiny(method, tiny_llama, tmp_path / f"accum{accum}", **values, rewards="http", reward_url=url))
    one, two = (next(r for r in read_metrics(run.metrics) if "score" in r) for run in runs)
    assert one["actor_grad_norm"] > 1e-3 and 1 < one["completions/mean_length"] < 5  # lengths vary
    assert two["actor_grad_norm"] == pytest.approx(one["actor_grad_norm"], rel=1e-4)
    assert two["policy_loss"] == pytest.approx(one["policy_loss"], rel=1e-4, abs=1e-7)


def test_dapo_drops_all_equal_groups_and_samples_more_prompts(tiny_llama, tmp_path, score_server):
    # The first round scores every answer 1.0 (all groups dropped); later rounds score each text differently.
    url = score_server(lambda call, responses: [1.0] * len(responses) if call == 1 else text_score(call, responses))
    run = train_tiny("dapo", tiny_llama, tmp_path / "run", **GROUP_TINY, max_steps=1, rewards="http", reward_url=url,
                     overlong_buffer=0)
    record = next(r for r in read_metrics(run.metrics) if "score" in r)
    assert record["groups_dropped"] == 2 and record["groups_resampled"] == 2 and record["sampling_rounds"] == 2
    assert record["groups_filled_with_dropped"] == 0 and record["response_utilization"] == 1.0
    assert record["samples"] == 8.0  # both rounds count as generated samples


def test_dapo_with_rewards_always_equal_fills_with_dropped_groups_and_moves_nothing(tiny_llama, tmp_path, score_server):
    """All-equal rewards: every round dropped, the tries bounded and reported, zero advantage, zero gradient."""
    url = score_server(lambda call, responses: [1.0] * len(responses))
    run = train_tiny("dapo", tiny_llama, tmp_path / "run", **GROUP_TINY, max_steps=1, rewards="http", reward_url=url,
                     overlong_buffer=0, max_sampling_tries=3)
    record = next(r for r in read_metrics(run.metrics) if "score" in r)
    assert record["sampling_rounds"] == 3 and record["groups_dropped"] == 6 and record["groups_filled_with_dropped"] == 2
    assert record["response_utilization"] == 0.0 and record["actor_grad_norm"] == 0.0
    assert all(v.abs().max().item() == 0.0 for k, v in state_dict_of(run.final).items() if "lora_B" in k)


def test_dcpo_smooths_advantages_over_a_prompts_visits(tiny_llama, tmp_path, score_server):
    """One prompt, seen every step: from the second visit an all-equal group still gets advantages (DCPO's point)."""
    data = tmp_path / "one.jsonl"
    row = {"prompt": [{"role": "user", "content": "What is the capital of Peru?"}], "task": "capital", "answer": "Lima"}
    data.write_text(json.dumps(row) + "\n")
    # Step 1 scores the group 0 and 1; step 2 scores everything 1: GRPO would see advantage 0 there.
    url = score_server(lambda call, responses: [0.0, 1.0] if call == 1 else [1.0] * len(responses))
    values = {**GROUP_TINY, "dataset": str(data), "batch_size": 2, "minibatch_size": 2, "max_steps": 2, "save_steps": 1}
    run = train_tiny("dcpo", tiny_llama, tmp_path / "run", **values, rewards="http", reward_url=url)
    assert metric_values(run, "response_utilization") == [1.0, 1.0]
    state = json.loads((run.checkpoints / "checkpoint-2" / "trainer_state.json").read_text())
    mean, std, visits = state["prompt_stats"]["0"]
    # Visit 1: [0, 1] -> mean 0.5, std (unbiased) sqrt(0.5). Visit 2: [1, 1] -> mean 1, std 0. Combined (n = 1 earlier
    # visit): mean (0.5 + 1) / 2 = 0.75; var (1 * 0.5 + 0 + 1/2 * (1 - 0.5)^2) / 2 = 0.3125.
    assert visits == 2 and mean == pytest.approx(0.75) and std == pytest.approx(0.3125**0.5, rel=1e-6)


def _command(method: str, model: Path, out: Path, url: str, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tandemlm.cli.main", "align", method, "--model", str(model), "--dataset", str(data),
        "--lora", "--batch-size", "4", "--num-generations", "2", "--minibatch-size", "2", "--max-completion-length", "6",
        "--max-length", "96", "--threads", "1", "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--save-steps", "2",
        "--rewards", "http", "--reward-url", url, "--output-dir", str(out), *extra,
    ]


def test_dcpo_resumes_after_kill_9_with_the_same_metrics_and_weights(tiny_llama, tmp_path, score_server):
    """Two prompts, both drawn every step: from step 2 DCPO's advantages read each prompt's saved statistics."""
    url = score_server(text_score)
    data = tmp_path / "two.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is the capital of {c}?"}], "task": "capital", "answer": a}
            for c, a in (("Peru", "Lima"), ("Chad", "N'Djamena"))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps = 6
    whole = subprocess.run(_command("dcpo", tiny_llama, tmp_path / "whole", url, data, "--max-steps", str(steps)),
                           env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "broken"
    resumed_from = kill_at_first_checkpoint(_command("dcpo", tiny_llama, out, url, data, "--max-steps", str(steps)), out, env)
    assert resumed_from < steps
    again = subprocess.run(_command("dcpo", tiny_llama, out, url, data, "--max-steps", str(steps), "--resume"),
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    expected = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(resumed_from + 1, steps + 1):
        for key in (*REPRODUCIBLE, "samples"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert not changed_tensors(state_dict_of(out / "final"), state_dict_of(tmp_path / "whole" / "final"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_a_lora_run_trains_on_the_gpu(method, tiny_llama, tmp_path, score_server):
    """Without QLoRA nothing else places the base: the trainer must put it on the GPU (CUDA memory is used)."""
    url = score_server(text_score)
    values = {**GROUP_TINY, "minibatch_size": 2}
    if method == "ppo":
        values = {k: v for k, v in values.items() if k != "num_generations"}
    run = train_tiny(method, tiny_llama, tmp_path / "run", **values, rewards="http", reward_url=url)
    assert run.config.bf16  # resolved for the GPU
    assert [r for r in read_metrics(run.metrics) if "score" in r][-1]["peak_memory_mb"] > 1.0  # CUDA MiB, not RSS
