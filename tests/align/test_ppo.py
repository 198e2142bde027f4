"""PPO on the tiny Llama: it trains, resumes exactly after kill -9, stops itself on trouble, and refuses what it cannot do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import changed_tensors, chat_once, kill_at_first_checkpoint, state_dict_of, tiny_config, train_tiny

from tandemlm.align.errors import ConfigError
from tandemlm.align.metrics import read_metrics
from tandemlm.align.run_folder import complete_checkpoints

# Small PPO: 4 prompts per step in minibatches of 2, two passes, 6-token responses.
PPO_TINY: dict[str, Any] = {
    "dataset": "builtin:capitals_train", "lora": True, "batch_size": 4, "minibatch_size": 2, "ppo_epochs": 2,
    "max_completion_length": 6, "max_length": 96,
}
# Every logged quantity the issue asks for (the reward-hacking watch reads the length and the reward).
PPO_METRICS = (
    "score", "reward", "kl", "non_score_reward", "beta", "policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy",
    "completions/mean_length", "eos_rate", "rollout_s", "update_s", "tokens_per_s", "peak_memory_mb",
)
# Deterministic quantities a resumed run must reproduce (timings and memory are not).
REPRODUCIBLE = ("score", "kl", "non_score_reward", "beta", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "completions/mean_length")


def test_ppo_trains_actor_and_critic_on_one_base_and_logs_everything(tiny_llama, reward_run, tmp_path):
    run = train_tiny(
        "ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=3, rewards="reward_model:1,verifier:0.5",
        reward_model=str(reward_run.dir),
    )
    records = [r for r in read_metrics(run.metrics) if "score" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in (*PPO_METRICS, "rewards/reward_model/mean", "rewards/verifier/mean"):
        assert key in records[-1], key
    # generate's log-probs (KV cache, left padding) equal the trainer's forward: checked on the first step, then used.
    assert records[0]["rollout_logprob_diff"] < 1e-4 and "rollout_logprob_diff" not in records[1]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters: the policy is the reference
    assert records[-1]["kl"] != 0.0 and records[-1]["policy_loss"] != records[0]["policy_loss"]
    adapter = state_dict_of(run.final)
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())  # the actor moved
    critic = state_dict_of(run.final / "critic")
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in critic.items())  # so did the critic
    assert run.info()["status"] == "finished" and run.info()["global_step"] == 3
    samples = [json.loads(line) for line in (run.dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2, 3] and len(samples[0]["samples"]) == 2
    assert "capital" in samples[0]["samples"][0]["prompt"] and isinstance(samples[-1]["samples"][0]["score"], float)
    for plot in ("reward", "kl", "length", "ppo_losses", "ppo_update"):
        assert (run.plots / f"{plot}.png").is_file()

    _check_downstream(run, tmp_path)


def _check_downstream(run: Any, tmp_path: Path) -> None:
    """A finished PPO run merges, quantizes to a GGUF that chats, shows in the Runs tab and loads into Compare."""
    from tandemlm.align.merge import merge_run
    from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model
    from tandemlm.ui.engines import EnginePool, EngineSlot
    from tandemlm.ui.runs_tab import load_run_policy, show_run

    merged = merge_run(run.dir)  # final/ is a plain PEFT adapter: merge works unchanged
    gguf = quantize_model(QuantizeConfig(model=str(merged), qtype="q8_0", out=tmp_path / "ppo-q8_0.gguf", use_cache=False)).path
    chat_once(gguf, backend="llama.cpp")
    plots, summary, config_text, status = show_run(str(run.dir.parent), run.dir.name)
    assert {caption for _, caption in plots} >= {"reward", "kl", "ppo_losses", "ppo_update"}
    assert {row[0] for row in summary} >= {"score", "kl", "value_loss", "clipfrac"} and "method: ppo" in config_text
    assert f"policy: LoRA adapter `{run.final}` on `{run.base_model}`" in status
    pool = EnginePool()
    slots = {"policy": EngineSlot("policy", pool, "smollm2"), "reference": EngineSlot("reference", pool, "smollm2")}
    try:
        policy_box, reference_box, _, note = load_run_policy(slots, str(run.dir.parent), run.dir.name)
        assert note.startswith("Loaded") and policy_box == str(run.dir) and reference_box == str(run.base_model)
        assert slots["policy"].loaded and slots["reference"].loaded
    finally:
        pool.close()


def test_shared_base_reward_adapter_scores_like_the_reward_model(tiny_llama, reward_run):
    """The reward run attached as a frozen adapter on the PPO base scores as the merged reward model does."""
    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.ppo.method import build_actor_critic
    from tandemlm.align.ppo.scoring import SeparateRewardModel, SharedBaseRewardModel

    config = tiny_config("ppo", tiny_llama, tiny_llama / "unused", **PPO_TINY, rewards="reward_model", reward_model=str(reward_run.dir))
    config.lora, config.gradient_checkpointing, config.bf16 = True, False, False
    ac = build_actor_critic(config, tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    rows = [{"prompt": [{"role": "user", "content": f"What is the capital of {c}?"}]} for c in ("France", "Peru", "Chad")]
    texts = ["Paris.", "The capital is Lima, a city.", "N'Djamena"]
    shared = SharedBaseRewardModel(reward_run.dir, ac, tokenizer)(rows, texts)
    separate = SeparateRewardModel(reward_run.dir, None)(rows, texts)
    assert shared == pytest.approx(separate, abs=1e-4)
    assert max(separate) - min(separate) > 1e-3  # the scores differ, so the comparison means something
    # The critic starts as the reward model (auto: a LoRA reward run on the same base): V at the last token = score.
    import torch

    from tandemlm.align.ppo.rollout import left_pad

    chat = tokenizer.apply_chat_template([*rows[0]["prompt"], {"role": "assistant", "content": texts[0]}], tokenize=False)
    ids, mask = left_pad([tokenizer(chat, add_special_tokens=False)["input_ids"]], tokenizer.pad_token_id, "cpu")
    with torch.no_grad(), ac.critic() as decoder:
        values = ac.values(decoder, torch.cat([ids, ids[:, -1:]], 1), torch.cat([mask, mask[:, -1:]], 1), 1)
    assert values[0, 0].item() == pytest.approx(shared[0], abs=1e-4)


def _ppo_command(model: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "tandemlm.cli.main", "align", "ppo", "--model", str(model), "--dataset", "builtin:capitals_train",
        "--lora", "--batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2", "--max-completion-length", "6",
        "--max-length", "96", "--threads", "1", "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--save-steps", "2",
        "--rewards", "http", "--reward-url", url, "--output-dir", str(out), *extra,
    ]


def _length_score(call: int, responses: list[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


def test_resume_after_kill_9_logs_the_same_metrics_as_an_unbroken_run(tiny_llama, tmp_path, score_server):
    url = score_server(_length_score)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps = 8
    whole = subprocess.run(_ppo_command(tiny_llama, tmp_path / "whole", url, "--max-steps", str(steps)), env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "broken"
    resumed_from = kill_at_first_checkpoint(_ppo_command(tiny_llama, out, url, "--max-steps", str(steps)), out, env)
    (out / "checkpoints" / ".checkpoint-6.partial").mkdir(exist_ok=True)  # what a kill mid-save leaves
    assert resumed_from < steps
    again = subprocess.run(_ppo_command(tiny_llama, out, url, "--max-steps", str(steps), "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]

    expected = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(got) == list(range(1, steps + 1))  # redone steps replaced, not duplicated
    sampled = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sampled == list(range(1, steps + 1))  # samples.jsonl is cut back on resume too
    for step in range(resumed_from + 1, steps + 1):
        for key in REPRODUCIBLE:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert json.loads((out / "run.json").read_text())["resumed_from"] == f"checkpoint-{resumed_from}"
    assert not (out / "checkpoints" / ".checkpoint-6.partial").exists()
    assert state_dict_of(out / "final").keys() == state_dict_of(tmp_path / "whole" / "final").keys()
    assert not changed_tensors(state_dict_of(out / "final"), state_dict_of(tmp_path / "whole" / "final"))


def test_exploding_value_loss_stops_naming_step_and_keeps_the_last_checkpoint(tiny_llama, tmp_path, score_server):
    url = score_server(lambda call, responses: [1e6 if call >= 2 else 0.5] * len(responses))
    with pytest.raises(ConfigError, match=r"^step 2: value_loss .* exceeds max_value_loss 1000"):
        train_tiny("ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=4, save_steps=1, rewards="http",
                   reward_url=url, reward_clip=0.0, max_value_loss=1000.0)
    run_dir = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-1"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    assert not (run_dir / "final").exists()


def test_a_nan_score_stops_naming_the_step_and_source(tiny_llama, tmp_path, score_server):
    url = score_server(lambda call, responses: [float("nan") if call == 3 else 0.5] * len(responses))
    with pytest.raises(ConfigError, match=r"^step 3: rewards: http returned a non-finite score; stopped"):
        train_tiny("ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=4, save_steps=2, rewards="http", reward_url=url)
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-2"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "stopped"


def test_a_sampler_on_stale_weights_is_caught(tiny_llama, tmp_path, monkeypatch, score_server):
    """Rollouts drawn from weights other than the trained ones (a sync that failed) stop the run."""
    from tandemlm.align.ppo import method
    from tandemlm.align.ppo.rollout import TransformersSampler

    class StaleSampler(TransformersSampler):
        same_weights = False  # a separate engine: checked every step

        def __call__(self, ac: Any, rows: Any, prompt_ids: Any) -> Any:
            with ac.model.disable_adapter():  # the initial policy, as if the update never reached the sampler
                return super().__call__(ac, rows, prompt_ids)

    monkeypatch.setattr(method, "build_sampler", lambda c, ac, tokenizer, folder: StaleSampler(tokenizer, c.max_completion_length, c.temperature, c.top_k))
    url = score_server(_length_score)
    with pytest.raises(ConfigError, match=r"^step 2: rollout log-probs differ from the trainer's by"):
        train_tiny("ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=3, rewards="http", reward_url=url, logprob_tolerance=1e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 6, "minibatch_size": 4}, "batch_size (6) must be a multiple of minibatch_size (4)"),
        ({"eval_steps": 5}, "eval_steps: ppo does not evaluate during training"),
        ({"trl_args": {"x": 1}}, "trl_args: ppo runs on tandemlm's own RL trainer"),
        ({"report_to": "wandb"}, "report_to: ppo writes metrics.jsonl and plots only"),
        ({"rewards": "http"}, "rewards uses http but reward_url is not set"),
        ({"rewards": "judge"}, "rewards: unknown reward 'judge'; known rewards: http, reward_model, verifier"),
        ({"kl_estimator": "k2"}, "kl_estimator must be one of k1, k3"),
        ({"dual_clip": 0.5}, "dual_clip must be greater than 1"),
    ],
)
def test_bad_settings_fail_naming_the_field(tiny_llama, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config("ppo", tiny_llama, tmp_path / "run", **{**PPO_TINY, **overrides})


def test_prompt_too_long_and_verifier_rows_without_task_fail_before_loading(tiny_llama, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=rf"{data} row 1: the verifier reward needs 'task' and 'answer'"):
        train_tiny("ppo", tmp_path / "no-model", tmp_path / "run", **{**PPO_TINY, "dataset": str(data)})
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"row 1: the prompt is \d+ tokens, more than max_length - max_completion_length = 4"):
        train_tiny("ppo", tiny_llama, tmp_path / "run2", **{**PPO_TINY, "max_length": 10})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_frozen_prefix_gives_the_same_logprobs_and_values_as_a_full_forward(arch, tmp_path):
    """Adapters on the top layer only: passes that start from the cached lower layers match full forwards."""
    import torch

    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.ppo.method import build_actor_critic
    from tandemlm.align.ppo.rollout import left_pad, tokenize_prompts
    from tandemlm.testing.tiny_models import tiny_model

    folder = tiny_model(arch)
    config = tiny_config("ppo", folder, tmp_path / "run", **PPO_TINY, lora_layers=1)
    config.lora, config.gradient_checkpointing, config.bf16 = True, False, False
    ac = build_actor_critic(config, folder)
    assert ac.frozen_layers == 1
    with torch.no_grad():
        for name, param in ac.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # adapters that change the output, so both paths must apply them
        ac.value_head.summary.weight.normal_()
    tokenizer = load_tokenizer(folder)
    prompts = [[{"role": "user", "content": text}] for text in ("What is the capital of Peru?", "Hi")]
    ids, mask = left_pad(tokenize_prompts(tokenizer, prompts), tokenizer.pad_token_id, "cpu")
    prefix = ac.prefix(ids, mask)
    full = {}
    with torch.no_grad():
        for role in (ac.actor, ac.reference):
            with role() as model:
                full[role] = ac.logprobs(model, ids, mask, 4, 1.0)[0]
                cached = ac.logprobs(model, ids, mask, 4, 1.0, prefix=prefix)[0]
                assert torch.allclose(full[role], cached, atol=1e-5)
        assert not torch.allclose(full[ac.actor], full[ac.reference], atol=1e-3)  # the adapters matter
        with ac.critic() as decoder:
            assert torch.allclose(ac.values(decoder, ids, mask, 4), ac.values(decoder, ids, mask, 4, prefix=prefix), atol=1e-5)


@pytest.mark.gpu
def test_qlora_ppo_on_a_gpu_trains_adapters_over_a_4bit_base(tiny_llama, tmp_path, score_server):
    """One 4-bit base under both adapters, bf16 compute, checkpointing on: the one-GPU configuration."""
    pytest.importorskip("bitsandbytes")
    url = score_server(_length_score)
    run = train_tiny(
        "ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=2, qlora=True, rewards="http", reward_url=url,
    )
    config = run.config
    assert config.qlora and config.bf16 and config.gradient_checkpointing  # resolved for the GPU
    records = [r for r in read_metrics(run.metrics) if "score" in r]
    assert len(records) == 2 and records[0]["rollout_logprob_diff"] < 5e-2  # bf16 cache vs forward: looser
    assert records[-1]["peak_memory_mb"] > 0
    adapter = state_dict_of(run.final)
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())


def test_full_fine_tune_trains_a_separate_critic_and_resumes(tiny_llama, tmp_path, score_server):
    """``lora: false``: all actor weights train, the critic is its own copy, the reference stays the base."""
    url = score_server(_length_score)
    settings = {**PPO_TINY, "lora": False, "rewards": "http", "reward_url": url, "save_steps": 1}
    train_tiny("ppo", tiny_llama, tmp_path / "run", **settings, max_steps=1)
    run = train_tiny("ppo", tiny_llama, tmp_path / "run", **settings, max_steps=2, resume=True)
    assert run.info()["resumed_from"] == "checkpoint-1" and not run.is_adapter
    base, trained = state_dict_of(tiny_llama), state_dict_of(run.final)
    assert changed_tensors(base, trained)  # the actor's own weights moved
    from safetensors.torch import load_file

    critic = load_file(run.final / "critic" / "critic.safetensors")
    assert (run.final / "critic" / "value_head.safetensors").is_file()
    backbone = {k.removeprefix("model."): v for k, v in base.items()}
    assert set(critic) <= set(backbone) and changed_tensors(backbone, critic)  # a trained copy of the backbone
    records = [r for r in read_metrics(run.metrics) if "score" in r]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["kl"] != 0.0


def test_critic_warmup_holds_the_actor_and_the_kl_controller_adapts_beta(tiny_llama, tmp_path, score_server):
    url = score_server(_length_score)
    run = train_tiny(
        "ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=2, rewards="http", reward_url=url,
        critic_warmup_steps=2, beta=0.05, target_kl=1.0, kl_horizon=10,
    )
    records = [r for r in read_metrics(run.metrics) if "score" in r]
    assert [r["critic_warmup"] for r in records] == [1.0, 1.0] and "policy_loss" not in records[0]
    actor = state_dict_of(run.final)
    assert all(t.abs().sum() == 0 for name, t in actor.items() if "lora_B" in name)  # the actor never stepped
    from safetensors.torch import load_file

    critic = load_file(run.final / "critic" / "critic.safetensors")
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in critic.items())  # the critic did
    # Step 1's KL is 0 (actor = reference), so the error clips to -0.2: beta *= 1 - 0.2 * 4 samples / 10.
    assert records[0]["beta"] == pytest.approx(0.05) and records[1]["beta"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10))


def test_missing_eos_penalty_lowers_the_score_of_cut_off_responses(tiny_llama, tmp_path, score_server):
    """The tiny random model never samples EOS in 6 tokens: every response pays the penalty."""
    url = score_server(lambda call, responses: [0.5] * len(responses))
    run = train_tiny("ppo", tiny_llama, tmp_path / "run", **PPO_TINY, max_steps=1, rewards="http", reward_url=url, missing_eos_penalty=2.0)
    record = next(r for r in read_metrics(run.metrics) if "score" in r)
    assert record["eos_rate"] == 0.0 and record["rewards/http/mean"] == 0.5
    assert record["score"] == pytest.approx(0.5 - 2.0)


def test_http_reward_serves_grpo_shaped_calls_and_fails_in_one_line(score_server):
    """The same endpoint scores GRPO's conversational completions; a dead or wrong endpoint is one line naming it."""
    from tandemlm.align.ppo.group_config import GRPORunConfig
    from tandemlm.align.rewards import HttpReward

    url = score_server(lambda call, responses: [float(len(r)) for r in responses])
    prompts = [[{"role": "user", "content": "Capital of Peru?"}]] * 2
    completions = [[{"role": "assistant", "content": "Lima"}], [{"role": "assistant", "content": "It is Lima."}]]
    assert HttpReward(url)(prompts, completions) == [4.0, 11.0]
    with pytest.raises(ConfigError, match=r"^reward_url http://127\.0\.0\.1:1/: request failed"):
        HttpReward("http://127.0.0.1:1/", timeout=5)(prompts, completions)
    short = score_server(lambda call, responses: [1.0])
    with pytest.raises(ConfigError, match=r"1 scores for 2 responses"):
        HttpReward(short)(prompts, completions)
    with pytest.raises(ConfigError, match="rewards uses http but reward_url is not set"):
        GRPORunConfig(dataset="builtin:capitals_train", rewards="verifier,http")
