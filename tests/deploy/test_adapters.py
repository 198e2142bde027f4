"""LoRA adapters served beside their base from one resident model: `tandem serve BASE --adapter NAME=PATH`.

The anchor is PEFT itself: an adapter view must give the tokens and log-probabilities that
``PeftModel`` gives directly, and the base name must keep giving the base's.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from typer.testing import CliRunner

from tandemlm.cli.main import app
from tandemlm.deploy.engine import collect
from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,"]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _save_lora(model: torch.nn.Module, folder: Path, alpha: int = 64) -> Path:
    # init_lora_weights=False: random A and B; a large alpha so the adapter visibly changes the output.
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return _save_lora(base, tmp_path_factory.mktemp("lora") / "policy")


@pytest.fixture(scope="module")
def wrong_adapter(tmp_path_factory) -> Path:
    """An adapter for a model of another width (hidden size 64, not the tiny Llama's)."""
    small = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )
    return _save_lora(small, tmp_path_factory.mktemp("lora") / "wrong")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, adapter):
    eng = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=4, dtype="float32", adapters={"policy": adapter})
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def peft_policy(tiny_llama_dir, adapter):
    """The adapted model straight from PEFT, with its tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def _peft_greedy(peft_policy, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer = peft_policy
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_adapter_name_generates_what_peft_generates_and_the_base_name_does_not(engine, peft_policy):
    view = engine.adapter_view("policy")
    assert view.info.model_id == "policy" and view.parent == engine.info.model_id
    differing = 0
    for prompt in PROMPTS:
        adapted = collect(view.generate(prompt, GREEDY)).text
        assert adapted == _peft_greedy(peft_policy, prompt, GREEDY.max_tokens)
        differing += adapted != collect(engine.generate(prompt, GREEDY)).text
    assert differing >= 3


@pytest.mark.slow
def test_a_batch_mixing_base_and_adapter_rows_gives_each_row_its_solo_tokens(engine, all_at_once):
    view = engine.adapter_view("policy")
    jobs = [(engine if i % 2 else view, prompt) for i, prompt in enumerate(PROMPTS)]
    solo = [collect(target.generate(prompt, GREEDY)).text for target, prompt in jobs]
    engine.max_batch_rows = 0
    assert all_at_once(jobs, GREEDY) == solo
    assert engine.max_batch_rows >= 2  # base and adapter rows shared a forward pass


@pytest.mark.slow
def test_scoring_through_the_view_is_peft_log_softmax(engine, peft_policy):
    model, tokenizer = peft_policy
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    prompt, target = ids[:4], ids[4:]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(target)[:, None])[:, 0]
    view = engine.adapter_view("policy")
    adapted = torch.tensor(view.score_tokens(prompt, target))
    assert torch.allclose(adapted, expected, atol=1e-4)
    base = torch.tensor(engine.score_tokens(prompt, target))
    assert (base - expected).abs().max() > 0.1  # the base name scores without the adapter
    top = view.prompt_logprobs(prompt, target, top=2)
    assert [t.logprob for t in top] == pytest.approx(adapted.tolist(), abs=1e-5) and len(top[0].top_logprobs) == 2
    pairs = view.token_logprobs([{"role": "user", "content": "hi"}], "Hello there")
    assert pairs and pairs != engine.token_logprobs([{"role": "user", "content": "hi"}], "Hello there")


@pytest.mark.slow
def test_unknown_and_misfit_adapters_fail_in_one_line_and_leave_the_base_as_it_was(engine, wrong_adapter, adapter, tmp_path):
    before = collect(engine.generate(PROMPTS[0], GREEDY)).text
    with pytest.raises(EngineError, match=r"adapter 'nope' is not loaded \(loaded: policy\)"):
        collect(engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2, adapter="nope")))
    with pytest.raises(EngineError, match=r"not loaded"):
        engine.adapter_view("nope")
    with pytest.raises(EngineError, match=r"does not fit .*size mismatch") as caught:
        engine.load_adapter("wrong", str(wrong_adapter))
    assert "\n" not in str(caught.value) and engine.loaded_adapters() == ["policy"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(EngineError, match=r"adapter_model.bin \(pickle, not loaded\)"):
        engine.load_adapter("pickled", str(pickled))
    assert collect(engine.generate(PROMPTS[0], GREEDY)).text == before


@pytest.mark.slow
def test_a_failed_first_load_leaves_the_base_untouched(tiny_llama_dir, wrong_adapter):
    fresh = load_engine(str(tiny_llama_dir), backend="transformers", dtype="float32")
    try:
        before = fresh.score_tokens([1, 5, 9], [200, 300])
        with pytest.raises(EngineError, match="does not fit"):
            fresh.load_adapter("wrong", str(wrong_adapter))
        assert fresh.score_tokens([1, 5, 9], [200, 300]) == pytest.approx(before, abs=1e-6)
    finally:
        fresh.close()


def test_a_backend_without_adapters_refuses_them():
    mock = MockEngine()
    with pytest.raises(EngineError, match="the mock backend cannot serve adapters"):
        mock.load_adapter("policy", "/nowhere")
    with pytest.raises(EngineError, match="adapter is not supported by the mock backend"):
        mock.generate("hi", SamplingParams(adapter="policy"))
    assert "adapter" in SamplingParams(adapter="p").features_used() and "adapter" not in SamplingParams().features_used()


@pytest.mark.slow
def test_http_models_lists_base_and_adapter_and_requests_pick_by_name(engine, serve):
    base_name = engine.info.model_id
    engines = {base_name: engine, "policy": engine.adapter_view("policy", base_name)}
    expected = {name: collect(e.generate(PROMPTS[1], GREEDY)).text for name, e in engines.items()}
    assert expected["policy"] != expected[base_name]
    with serve(engines) as url:
        cards = {card["id"]: card for card in httpx.get(f"{url}/models").json()["data"]}
        assert set(cards) == {base_name, "policy"}
        assert cards["policy"]["parent"] == base_name and "parent" not in cards[base_name]
        for name, text in expected.items():
            body = {"model": name, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
            reply = httpx.post(f"{url}/completions", json=body, timeout=60).json()
            assert reply["model"] == name and reply["choices"][0]["text"] == text
        missing = httpx.post(f"{url}/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
        assert missing.status_code == 404 and "policy" in missing.json()["error"]["message"]
    assert engine.generate  # the server closed the view, not the base: it still answers
    assert collect(engine.generate(PROMPTS[1], GREEDY)).text == expected[base_name]


def _serve(*args: str):
    return CliRunner().invoke(app, ["serve", *args])


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]  # (loading progress aside)
    assert len(errors) == 1, result.output
    return errors[0]


def test_cli_adapter_without_a_name_or_with_a_missing_path_fails_in_one_line(tiny_llama_dir, tmp_path):
    assert "expected NAME=REF" in _one_line_error(_serve(str(tiny_llama_dir), "--adapter", "bad"))
    line = _one_line_error(_serve(str(tiny_llama_dir), "--adapter", f"p={tmp_path / 'missing'}"))
    assert "is not a folder" in line
    line = _one_line_error(_serve(str(tiny_llama_dir), "--adapter", f"p={tmp_path}"))
    assert "adapter_config.json is missing" in line


def test_cli_adapter_recorded_for_another_base_fails_before_loading(tiny_qwen2_dir, adapter, tmp_path):
    # The adapter records the tiny Llama as its base; serving it on the tiny Qwen2 is refused up front.
    line = _one_line_error(_serve(str(tiny_qwen2_dir), "--adapter", f"policy={adapter}"))
    assert "was trained on" in line and "model_type llama vs qwen2" in line


@pytest.mark.slow
def test_cli_adapter_that_does_not_fit_the_weights_fails_in_one_line(tiny_llama_dir, wrong_adapter):
    line = _one_line_error(_serve(str(tiny_llama_dir), "--backend", "transformers", "--adapter", f"wrong={wrong_adapter}"))
    assert "does not fit" in line and "size mismatch" in line


def test_cli_run_folder_resolves_to_its_final_adapter(tmp_path, adapter):
    from tandemlm.cli.options import adapter_folders

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for path in adapter.iterdir():
        (run / "final" / path.name).write_bytes(path.read_bytes())
    (run / "config.yaml").write_text("method: dpo\n")
    (run / "run.json").write_text(json.dumps({"method": "dpo", "adapter": True, "base_model": "x"}))
    assert adapter_folders([f"policy={run}"]) == {"policy": (run / "final").resolve()}


@pytest.mark.slow
def test_vllm_serves_the_adapter_as_the_transformers_backend_does(tiny_llama_dir, adapter, engine):
    from tandemlm.deploy import vllm_engine

    if importlib.util.find_spec("vllm") is None or vllm_engine.unavailable_reason():
        pytest.skip(f"vLLM cannot run here: {vllm_engine.unavailable_reason()}")
    from tandemlm.models.resolve import resolve_model

    vllm = vllm_engine.load(
        resolve_model(str(tiny_llama_dir)), dtype="float32", context_length=512, enforce_eager=True, adapters={"policy": adapter}
    )
    try:
        view, hf_view = vllm.adapter_view("policy"), engine.adapter_view("policy")
        differing = 0
        for prompt in PROMPTS:
            adapted = collect(view.generate(prompt, GREEDY)).text
            assert adapted == collect(hf_view.generate(prompt, GREEDY)).text
            differing += adapted != collect(vllm.generate(prompt, GREEDY)).text
        assert differing >= 3
        ids = engine.tokenize("The quick brown fox jumps over the lazy dog", add_special_tokens=True)
        assert view.score_tokens(ids[:4], ids[4:]) == pytest.approx(hf_view.score_tokens(ids[:4], ids[4:]), abs=1e-3)
        with pytest.raises(EngineError, match="not loaded"):
            collect(vllm.generate("hi", SamplingParams(max_tokens=1, adapter="nope")))
    finally:
        vllm.close()
