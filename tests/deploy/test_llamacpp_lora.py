"""LoRA adapters on the llama.cpp backend: PEFT folders converted to GGUF LoRA, one adapter per decode.

The anchor is the transformers backend's adapter view (PEFT itself, checked in test_adapters.py):
the same tiny Llama (f32 GGUF here, HF there) with the same adapter must give the same greedy
tokens and the same scores, and the base name must keep giving the base's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tandemlm.cli.main import app
from tandemlm.deploy import llamacpp_lora
from tandemlm.deploy.engine import collect
from tandemlm.deploy.llamacpp_lora import base_config_folder, next_group
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError
from tandemlm.llamacpp import sources as llamacpp_source

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,"]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A LoRA with random A and B and a large alpha, so it visibly changes the output (as test_adapters.py)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora") / "policy"
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_cache(tmp_path_factory):
    """The GGUF LoRA cache in a temp folder (llama.cpp's sources stay in the shared cache)."""
    root = tmp_path_factory.mktemp("lora-cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(llamacpp_lora, "cache_dir", lambda: root)
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def engine(tiny_llama_gguf, adapter, lora_cache):
    eng = load_engine(str(tiny_llama_gguf), backend="llama.cpp", n_ctx=1024, n_parallel=4, adapters={"policy": adapter})
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_engine(tiny_llama_dir, adapter):
    eng = load_engine(str(tiny_llama_dir), backend="transformers", dtype="float32", adapters={"policy": adapter})
    yield eng
    eng.close()


@pytest.mark.slow
def test_adapter_output_differs_from_the_base_and_matches_the_transformers_view(engine, hf_engine):
    view, hf_view = engine.adapter_view("policy"), hf_engine.adapter_view("policy")
    assert "adapter" in engine.features and engine.loaded_adapters() == ["policy"]
    differing = 0
    for prompt in PROMPTS:
        adapted = collect(view.generate(prompt, GREEDY)).text
        assert adapted == collect(hf_view.generate(prompt, GREEDY)).text
        base = collect(engine.generate(prompt, GREEDY)).text
        assert base == collect(hf_engine.generate(prompt, GREEDY)).text
        differing += adapted != base
    assert differing >= 3


@pytest.mark.slow
def test_a_mixed_batch_of_base_and_adapter_requests_gives_each_its_solo_tokens(engine, all_at_once):
    view = engine.adapter_view("policy")
    jobs = [(engine if i % 2 else view, prompt) for i, prompt in enumerate(PROMPTS * 2)]
    solo = [collect(target.generate(prompt, GREEDY)).text for target, prompt in jobs]
    switches = engine.adapter_switches
    assert all_at_once(jobs, GREEDY) == solo
    assert engine.adapter_switches - switches >= 4  # the groups took turns, step by step


@pytest.mark.slow
def test_a_saved_prompt_state_is_restored_only_under_the_adapter_it_was_computed_with(engine):
    view = engine.adapter_view("policy")
    prompt = "Keep me in RAM: " + " ".join(PROMPTS * 4)  # over the prompt cache's 32-token minimum
    engine.drop_cached_prompts()
    adapted = collect(view.generate(prompt, GREEDY)).text  # cold, under the adapter
    engine.drop_cached_prompts()
    base_text = collect(engine.generate(prompt, GREEDY)).text
    engine.drop_cached_prompts(keep_in_ram=True)  # the base's state now lives only in the prompt cache
    restored = engine.restored_tokens
    assert collect(view.generate(prompt, GREEDY)).text == adapted
    assert engine.restored_tokens == restored  # the base's saved state is no prefix for the adapter
    engine.drop_cached_prompts(keep_in_ram=True)
    assert collect(engine.generate(prompt, GREEDY)).text == base_text
    assert engine.restored_tokens > restored  # the base's own state is


@pytest.mark.slow
def test_a_cached_prefix_is_reused_only_under_the_adapter_it_was_computed_with(engine):
    view = engine.adapter_view("policy")
    prompt = "Reuse me: " + PROMPTS[0]
    base_text = collect(engine.generate(prompt, GREEDY)).text
    before = engine.reused_tokens
    adapted = collect(view.generate(prompt, GREEDY)).text
    assert engine.reused_tokens == before  # the base's cache of this prompt is no prefix for the adapter
    assert collect(view.generate(prompt, GREEDY)).text == adapted
    assert engine.reused_tokens > before  # the adapter's own cache is
    assert collect(engine.generate(prompt, GREEDY)).text == base_text


@pytest.mark.slow
def test_scoring_through_the_view_matches_the_transformers_view(engine, hf_engine):
    ids = hf_engine.tokenize("The quick brown fox jumps over the lazy dog", add_special_tokens=True)
    prompt, target = ids[:4], ids[4:]
    expected = hf_engine.adapter_view("policy").score_tokens(prompt, target)
    view = engine.adapter_view("policy")
    assert view.score_tokens(prompt, target) == pytest.approx(expected, abs=1e-3)
    base = engine.score_tokens(prompt, target)
    assert base == pytest.approx(hf_engine.score_tokens(prompt, target), abs=1e-3)
    assert max(abs(a - b) for a, b in zip(base, expected, strict=True)) > 0.1
    top = view.prompt_logprobs(prompt, target, top=2)
    assert [t.logprob for t in top] == pytest.approx(expected, abs=1e-3) and len(top[0].top_logprobs) == 2


@pytest.mark.slow
def test_the_converted_gguf_is_cached_and_a_second_load_runs_no_converter(engine, adapter, lora_cache, tmp_path, monkeypatch):
    runs: list[list[str]] = []
    real = llamacpp_source.run_with_status
    monkeypatch.setattr(llamacpp_source, "run_with_status", lambda command, *rest: runs.append(command) or real(command, *rest))
    engine.load_adapter("again", str(adapter))  # converted when the engine loaded
    assert runs == [] and len(list(lora_cache.glob("lora-gguf/*.gguf"))) == 1
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
    engine.load_adapter("half", str(other))  # other content: converted once more
    engine.load_adapter("half-again", str(other))
    assert len(runs) == 1 and "convert_lora_to_gguf.py" in runs[0][1]
    assert sorted(p.suffix for p in (lora_cache / "lora-gguf").iterdir()) == [".gguf", ".gguf"]  # no temp files left


@pytest.mark.slow
def test_unknown_adapters_fail_in_one_line(engine):
    with pytest.raises(EngineError, match=r"adapter 'nope' is not loaded \(loaded: policy"):
        collect(engine.generate(PROMPTS[0], SamplingParams(max_tokens=2, adapter="nope")))
    with pytest.raises(EngineError, match="not loaded"):
        engine.prompt_logprobs([1, 2], [3], adapter="nope")
    with pytest.raises(EngineError, match="already loaded"):
        engine.load_adapter("policy", "/nowhere")


def test_groups_take_turns_base_first_then_adapters_by_name():
    assert next_group([None], None) is None
    assert next_group(["b", None, "a"], None) == "a"
    assert next_group(["b", None, "a"], "a") == "b"
    assert next_group(["b", None, "a"], "b") is None
    assert next_group(["b", None], "a") == "b"  # the last group may have no requests left
    assert next_group(["a"], "z") == "a"


def test_conversion_needs_a_local_base_config_folder(tmp_path, tiny_llama_dir):
    config = {"peft_type": "LORA", "base_model_name_or_path": "someone/on-the-hub"}
    with pytest.raises(EngineError, match="needs the base model's HF config folder") as caught:
        base_config_folder(tmp_path, config, None)
    assert "\n" not in str(caught.value) and "someone/on-the-hub" in str(caught.value)
    assert base_config_folder(tmp_path, config, lambda: tiny_llama_dir) == tiny_llama_dir
    local = {**config, "base_model_name_or_path": str(tiny_llama_dir)}
    assert base_config_folder(tmp_path, local, lambda: tmp_path) == tiny_llama_dir


def test_dora_and_rslora_adapters_are_refused(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    for flag in ("use_dora", "use_rslora"):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", flag: True}))
        with pytest.raises(EngineError, match="merge it instead"):
            llamacpp_lora.lora_gguf(tmp_path)


@pytest.mark.slow
def test_cli_adapter_without_a_local_base_on_a_gguf_fails_in_one_line(tiny_llama_gguf, adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp_lora, "cache_dir", lambda: tmp_path / "cache")
    hub = tmp_path / "hub"
    shutil.copytree(adapter, hub)
    config = json.loads((hub / "adapter_config.json").read_text())
    (hub / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/tiny"}))
    result = CliRunner().invoke(app, ["serve", str(tiny_llama_gguf), "--adapter", f"policy={hub}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "needs the base model's HF config folder" in errors[0], result.output
