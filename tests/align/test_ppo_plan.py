"""The PPO memory plan: counts worked by hand, parameter counts against real models, and the verdicts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tandemlm.align.ppo.plan import (
    ACTIVATION,
    BYTES,
    GIB,
    RUNTIME_BYTES,
    PlanInputs,
    available_memory,
    count_params_from_shapes,
    estimate,
    fits,
    format_plan,
    inputs_from_config,
    kv_cache_bytes,
    lora_param_count,
    settings_from_run,
    suggestions,
)

# An invented model small enough to check every number by hand.
SMALL = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}

QWEN25_15B = {  # Qwen/Qwen2.5-1.5B config.json (published)
    "model_type": "qwen2",
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}

QWEN2_7B = {  # Qwen/Qwen2-7B config.json (published)
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}


# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B config.json (published): Qwen2.5-1.5B's shapes, embeddings untied.
R1_DISTILL_QWEN_15B = {**QWEN25_15B, "tie_word_embeddings": False}
RL_RECIPES = ("ppo", "grpo", "dapo", "gspo", "dcpo")


def small(**settings: object) -> PlanInputs:
    base = {"batch_size": 2, "minibatch_size": 2, "prompt_length": 10, "response_length": 6, "lora_r": 4}
    return inputs_from_config(SMALL, **{**base, **settings})


def test_param_count_by_hand() -> None:
    # embed 1000*64 + 3 layers * (q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 + norms 2*64) + final norm 64
    # + untied lm_head 1000*64
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert count_params_from_shapes(SMALL) == 2 * 1000 * 64 + 3 * per_layer + 64
    tied = {**SMALL, "tie_word_embeddings": True}
    assert count_params_from_shapes(tied) == 1000 * 64 + 3 * per_layer + 64


def test_kv_cache_and_lora_counts_by_hand() -> None:
    inputs = small()
    # 2 (k, v) * 3 layers * 2 kv heads * 16 head dim * 16 tokens * batch 2 * 2 bytes
    assert kv_cache_bytes(inputs) == 2 * 3 * 2 * 16 * 16 * 2 * 2 == 12288
    # r=4 * (in + out) of q (64+64), k (64+32), v (64+32), o (64+64), gate (64+128), up (64+128), down (128+64)
    per_layer = 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert lora_param_count(inputs) == 3 * per_layer == 12288
    assert lora_param_count(small(lora_layers=1)) == per_layer
    assert lora_param_count(small(lora_modules=("q_proj", "v_proj"))) == 3 * 4 * (128 + 96)

    plan = estimate(inputs)
    assert plan.lora_params == 3 * per_layer
    assert plan.adapters == 2 * 3 * per_layer * 4  # actor + critic adapters, fp32
    assert plan.value_head == (64 + 1) * 4
    assert plan.optimizer == (2 * 3 * per_layer + 65) * 8  # two fp32 Adam states
    assert plan.gradients == (3 * per_layer + 65) * 4  # one role at a time
    assert plan.weights == inputs.n_params * 2
    assert plan.rollout_kv_cache == 12288
    assert plan.rollout_logits == 2 * 1000 * BYTES["rollout_logit"]  # one decode step at a time
    assert plan.update_logits == 2 * 7 * 1000 * BYTES["update_logit"]  # logits_to_keep = response + 1
    assert plan.total == plan.static + max(plan.rollout_phase, plan.update_phase)
    assert plan.static == sum(size for label, size, _ in plan.parts()[:7])


def test_update_logits_are_one_head_chunk_unless_the_model_transforms_its_logits() -> None:
    from tandemlm.align.ppo.model_shapes import HEAD_CHUNK_ELEMENTS

    long = small(minibatch_size=8, response_length=20_000)  # 8 x 20001 rows: far past one chunk
    chunk = HEAD_CHUNK_ELEMENTS["cuda"] // 1000
    assert long.plain_head and estimate(long).update_logits == chunk * 1000 * BYTES["update_logit"]
    on_cpu = estimate(small(minibatch_size=8, response_length=20_000, cuda=False))
    assert on_cpu.update_logits == HEAD_CHUNK_ELEMENTS["cpu"] // 1000 * 1000 * BYTES["update_logit"]
    capped = inputs_from_config({**SMALL, "final_logit_softcapping": 30.0}, minibatch_size=8, response_length=20_000,
                                batch_size=2, prompt_length=10, lora_r=4)
    assert not capped.plain_head  # Gemma 2's soft-capping: the model's forward makes every logit
    assert estimate(capped).update_logits == 8 * 20_001 * 1000 * BYTES["full_update_logit"]


def test_activations_by_hand() -> None:
    # fp32 full fine-tune without checkpointing: (6h + 2 kv + 4 I) numbers per token per layer, all 3 layers.
    numbers = 6 * 64 + 2 * 2 * 16 + 4 * 128
    plan = estimate(small(lora=False, dtype_bytes=4, gradient_checkpointing=False))
    assert plan.update_activations == ACTIVATION["update_graphs"] * numbers * 4 * (2 * 16) * 3
    # checkpointing: one hidden state per layer plus one layer recomputed.
    plan = estimate(small(lora=False, dtype_bytes=4, gradient_checkpointing=True))
    assert plan.update_activations == ACTIVATION["update_graphs"] * (64 * 32 * 4 * 3 + numbers * 4 * 32)
    # a bf16 base under fp32 adapters saves an fp32 copy of each adapted linear's input (7 linears: 6h + I in).
    bf16 = estimate(small(dtype_bytes=2, gradient_checkpointing=False, lora_layers=1))
    assert bf16.update_activations == ACTIVATION["update_graphs"] * (numbers * 2 + 4 * (6 * 64 + 128)) * 32


def test_n_params_matches_the_tiny_llama(tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    real = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert inputs_from_config(config).n_params == real
    assert inputs_from_config(AutoConfig.from_pretrained(tiny_llama_dir)).n_params == real
    # the LoRA count equals what PEFT creates (all linears of the decoder layers, lm_head excluded)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    adapter = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora_param_count(inputs_from_config(config, lora_r=8)) == adapter


def test_published_qwen_sizes() -> None:
    assert inputs_from_config(QWEN25_15B).n_params == pytest.approx(1.54e9, rel=0.02)
    assert inputs_from_config(QWEN2_7B).n_params == pytest.approx(7.6e9, rel=0.02)


def test_text_config_nesting() -> None:
    wrapped = {"model_type": "llava", "text_config": SMALL, "vision_config": {"hidden_size": 32}}
    assert inputs_from_config(wrapped).n_params == count_params_from_shapes(SMALL)
    assert inputs_from_config(wrapped).hidden_size == 64


def test_qlora_smaller_and_full_finetune_bigger() -> None:
    settings = {"batch_size": 8, "minibatch_size": 4, "prompt_length": 256, "response_length": 256}
    lora = estimate(inputs_from_config(QWEN2_7B, **settings))
    qlora = estimate(inputs_from_config(QWEN2_7B, qlora=True, **settings))
    full = estimate(inputs_from_config(QWEN2_7B, full_finetune=True, **settings))
    # NF4 block linears; embeddings and the untied lm_head (1.09B params) become fp32 under QLoRA
    assert qlora.weights == pytest.approx(6.5e9 * 0.516 + 1.09e9 * 4, rel=0.02)
    assert qlora.weights < 0.55 * lora.weights
    assert qlora.total < lora.total < full.total
    assert full.adapters == 0
    assert full.weights == pytest.approx(3 * 2 * 7.6e9, rel=0.05)  # actor + critic + reference in bf16
    assert full.optimizer > 2 * 7e9 * 12  # AdamW states + fp32 master for actor and critic


def test_settings_from_a_run_config() -> None:
    run = SimpleNamespace(
        lora=None, qlora=False, lora_r=8, lora_layers=2, lora_target="q_proj,v_proj", bf16=None, batch_size=8,
        minibatch_size=4, grad_accum=2, max_length=96, max_completion_length=32, gradient_checkpointing=None,
    )
    on_cpu = settings_from_run(run, cuda=False)
    assert on_cpu["lora"] is False and on_cpu["dtype_bytes"] == 4 and on_cpu["gradient_checkpointing"] is False
    on_gpu = settings_from_run(run, cuda=True)
    assert on_gpu["lora"] is True and on_gpu["dtype_bytes"] == 2 and on_gpu["gradient_checkpointing"] is True
    assert on_gpu["prompt_length"] == 64 and on_gpu["response_length"] == 32
    assert on_gpu["lora_modules"] == ("q_proj", "v_proj")
    inputs = inputs_from_config(SMALL, run, batch_size=16)  # keywords win over the run
    assert inputs.batch_size == 16 and inputs.micro_batch == 2 and inputs.lora_r == 8


def test_verdicts() -> None:
    plan = estimate(inputs_from_config(QWEN2_7B, batch_size=8, minibatch_size=4))
    text = format_plan(plan, ("GPU (test)", 1 * GIB))
    assert "does not fit" in text and "--qlora" in text and "GPU (test)" in text
    assert not fits(plan, 1 * GIB)
    tips = suggestions(plan)
    assert tips[0][0] == "--qlora" and all(a[1] >= b[1] > 0 for a, b in itertools.pairwise(tips))
    tiny = estimate(small())
    assert fits(tiny, 24 * GIB)
    text = format_plan(tiny, ("GPU", 24 * GIB))
    assert "fits in 24.0 GiB GPU with" in text
    for label in ("weights", "adapters", "optimizer", "rollout KV cache", "update logits", "= peak"):
        assert label in text
    assert tiny.total >= RUNTIME_BYTES


def test_available_memory_reports_something() -> None:
    label, size = available_memory()
    assert label and size > 0


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="qlora needs lora"):
        small(qlora=True, full_finetune=True)
    with pytest.raises(ValueError, match="lora_layers"):
        small(lora_layers=9)
    with pytest.raises(ValueError, match="dtype_bytes"):
        small(dtype_bytes=1)


def test_moe_and_mla_configs_count_on_the_meta_device() -> None:
    import torch
    import transformers

    from tandemlm.testing.tiny_models import COMMON, SPECS

    spec = SPECS["deepseek_v3"]
    config = getattr(transformers, spec.config_class)(**{**COMMON, **spec.config})
    with torch.device("meta"):
        real = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    inputs = inputs_from_config(config.to_dict())
    assert inputs.n_params == real
    assert inputs.num_kv_heads == inputs.num_attention_heads  # MLA caches per-head keys and values


def test_plan_from_the_cli_loads_nothing_and_prints_every_part(tiny_llama_dir):
    """``tandem align ppo --plan`` reads config.json only and says whether the run fits."""
    from typer.testing import CliRunner

    from tandemlm.cli.main import app

    result = CliRunner().invoke(
        app, ["align", "ppo", "--plan", "--model", str(tiny_llama_dir), "--dataset", "builtin:capitals_train", "--lora"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for part in ("weights", "adapters", "optimizer", "rollout KV cache", "update activations", "= peak"):
        assert part in result.output
    assert "fits in" in result.output or "does not fit" in result.output
    assert "done" not in result.output  # nothing trained


# --plan on a hub id reads config.json alone: from a temporary HF cache here, offline, with sockets refused.
CACHED_REPO = "tandem-test/cached-qwen"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def plan_cli(model: str, *flags: str) -> object:
    """``tandem align grpo --plan --model MODEL FLAGS`` in this process."""
    from typer.testing import CliRunner

    from tandemlm.cli.main import app

    args = ["align", "grpo", "--plan", "--model", model, "--dataset", "builtin:arithmetic_train", "--lora", *flags]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[object]]:
    """(an empty HF hub cache, the network attempts made): HF_HOME/HF_HUB_CACHE point to tmp, HF_HUB_OFFLINE=1,
    and every socket connection is refused and recorded (an attempt the code swallows still fails the test)."""
    import socket

    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub read the variable at import
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache, attempts


def test_plan_reads_a_cached_hub_config_offline(offline_hub_cache: tuple[Path, list[object]]) -> None:
    cache, attempts = offline_hub_cache
    repo = cache / ("models--" + CACHED_REPO.replace("/", "--"))  # huggingface_hub's cache layout
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN25_15B))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    before = sorted(cache.rglob("*"))

    result = plan_cli(CACHED_REPO)
    assert result.exit_code == 0, result.output
    assert "1.54B params" in result.output and "= peak" in result.output  # QWEN25_15B's count: its config was read
    assert sorted(cache.rglob("*")) == before  # nothing fetched: no blob, lock or marker written
    # A config.json path works too; the verdict then leaves room for an in-process vLLM engine.
    result = plan_cli(str(snapshot / "config.json"), "--rollout-backend", "vllm")
    assert result.exit_code == 0, result.output
    assert "1.54B params" in result.output and "less vLLM's" in result.output
    assert attempts == []


def test_plan_of_an_uncached_hub_id_offline_is_one_line(offline_hub_cache: tuple[Path, list[object]]) -> None:
    cache, attempts = offline_hub_cache
    result = plan_cli("tandem-test/not-cached")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for part in ("model tandem-test/not-cached", "HF_HUB_OFFLINE", str(cache), "path to the model's config.json"):
        assert part in lines[0]
    assert attempts == [] and list(cache.iterdir()) == []


def test_rl_recipes_fit_a_24_gib_gpu_by_the_plan() -> None:
    """Each RL recipe says it fits one 24 GB GPU: the plan agrees, with vLLM's share left free where it samples."""
    from tandemlm.align.config import build_config
    from tandemlm.align.ppo.method import plan_budget
    from tandemlm.align.registry import get_method

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    for method in RL_RECIPES:
        config = build_config(get_method(method).config_cls, recipes / f"{method}.yaml")
        assert config.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and config.uses_lora, method
        plan = estimate(inputs_from_config(R1_DISTILL_QWEN_15B, config))
        assert plan.inputs.n_params == pytest.approx(1.78e9, rel=0.01)  # the distill's 3.55 GB of bf16 weights
        label, budget = plan_budget(config, plan.weights, ("GPU (test)", 24 * GIB))
        if config.rollout_backend == "vllm":
            assert budget == int(24 * GIB * 0.7) and "vLLM" in label
        assert fits(plan, budget), (method, plan.total / GIB, budget / GIB)
