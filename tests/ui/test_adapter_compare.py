"""A LoRA run in Compare: policy = base + adapter, reference = the same base with the adapter off, one engine.

Runs → "Compare with base" on a LoRA run must load the base once (no merge), give the adapted
side its own per-token scores, and give exactly zero divergence when both sides are the base. The
same holds for the demo adapter shipped in the package (``demo:ppo-capitals``, the app's default
policy), whose base must resolve by its built-in name on any machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tandemlm.align.run_folder import RunFolder
from tandemlm.deploy import llamacpp_lora
from tandemlm.deploy.engine import AdapterView
from tandemlm.deploy.registry import load_engine
from tandemlm.errors import EngineError
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.turn import compare_reply
from tandemlm.ui.engines import EnginePool, EngineSlot
from tandemlm.ui.model_refs import DEMO_POLICY, DEMO_RUNS, SlotModel, base_ref, resolve_slot_model, run_base
from tandemlm.ui.runs_tab import load_run_policy, show_run

GREEDY = (8, 0.0, 1.0, 0, 0)  # max tokens, temperature, top-p, top-k, seed
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A LoRA with random A and B and a large alpha, so it visibly changes the scores (as tests/deploy)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def lora_cache(tmp_path, monkeypatch):
    """GGUF LoRA conversions go to a temp folder (llama.cpp's sources stay in the shared cache)."""
    monkeypatch.setattr(llamacpp_lora, "cache_dir", lambda: tmp_path / "lora-cache")


def _lora_run(root: Path, adapter: Path, model: Path, base_folder: Path) -> Path:
    """A finished `tandem align dpo --lora` run folder as run_folder.py lays it out (no merged/)."""
    run = root / "dpo-lora"
    shutil.copytree(adapter, run / "final")
    (run / "config.yaml").write_text("method: dpo\n")
    info = {"method": "dpo", "model": str(model), "base_model": str(base_folder), "adapter": True, "status": "finished"}
    (run / "run.json").write_text(json.dumps(info))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    return run


def _slots(loads: list[tuple[str, str, dict]], policy: str = "smollm2", backend: str = "auto") -> dict[str, EngineSlot]:
    def loader(model: str, backend: str, **options: object):
        loads.append((model, backend, options))
        return load_engine(model, backend, n_ctx=1024, **options)

    pool = EnginePool(loader)
    return {"policy": EngineSlot("policy", pool, policy, backend), "reference": EngineSlot("reference", pool, "smollm2", backend)}


def _divergence_total(html: str) -> float:
    return float(html.split("= <b>")[1].split("</b>")[0])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_compare_with_base_puts_the_adapter_on_and_off_in_one_engine(backend, adapter, tiny_llama_dir, tiny_llama_gguf, tmp_path):
    base = tiny_llama_dir if backend == "transformers" else tiny_llama_gguf
    run = _lora_run(tmp_path / "runs", adapter, base, tiny_llama_dir)
    assert "policy: LoRA adapter" in show_run(str(tmp_path / "runs"), run.name)[3]
    loads: list[tuple[str, str, dict]] = []
    slots = _slots(loads)
    policy_box, reference_box, models, note = load_run_policy(slots, str(tmp_path / "runs"), run.name)
    assert note == "Loaded `dpo-lora` as the policy (its base model as the reference, adapter off)", models
    assert (policy_box, reference_box) == (str(run), str(base))
    assert [(m, b) for m, b, _ in loads] == [(str(base), "auto")]  # one base engine, nothing merged
    policy, reference = slots["policy"].get(), slots["reference"].get()
    assert isinstance(policy, AdapterView) and policy.base is reference and policy.info.backend == backend
    assert f"LoRA on `{base}`" in slots["policy"].status()
    _adapter_on_then_off(slots, str(base))
    assert len(loads) == 1


def _adapter_on_then_off(slots: dict[str, EngineSlot], base: str) -> None:
    """Compare with the adapter on (its own per-token scores, non-zero divergence), then with the base on both sides (zero)."""
    policy, reference = slots["policy"].get(), slots["reference"].get()
    *_, last = list(compare_reply(slots, Judges(), MESSAGES[0]["content"], None, *GREEDY))
    left_div, right_div, comparison = last.left_divergence, last.right_divergence, last.comparison
    assert last.status.startswith("done") and comparison is not None
    answer = comparison.left.response
    on, off = policy.token_logprobs(MESSAGES, answer), reference.token_logprobs(MESSAGES, answer)
    assert [t for t, _ in on] == [t for t, _ in off]
    assert max(abs(a - b) for (_, a), (_, b) in zip(on, off, strict=True)) > 0.1  # the adapter changes the scores
    assert abs(_divergence_total(left_div)) > 0.1 and abs(_divergence_total(right_div)) > 0.1

    slots["policy"].set(base, slots["policy"].backend)  # adapter off on both sides: the same model, scored twice
    *_, last = list(compare_reply(slots, Judges(), MESSAGES[0]["content"], None, *GREEDY))
    assert _divergence_total(last.left_divergence) == 0.0 and _divergence_total(last.right_divergence) == 0.0


DEMO_RUN = DEMO_RUNS[DEMO_POLICY]


def test_the_demo_run_ships_a_small_safetensors_adapter_on_the_builtin_base():
    files = sorted(str(p.relative_to(DEMO_RUN)) for p in DEMO_RUN.rglob("*") if p.is_file())
    assert files == ["config.yaml", "eval.json", "final/adapter_config.json", "final/adapter_model.safetensors",
                     "metrics.jsonl", "run.json"]
    assert sum(p.stat().st_size for p in DEMO_RUN.rglob("*") if p.is_file()) < 8_000_000
    info = json.loads((DEMO_RUN / "run.json").read_text())
    assert (info["method"], info["model"], info["adapter"], info["status"]) == ("ppo", "smollm2", True, "finished")
    assert resolve_slot_model(DEMO_POLICY) == SlotModel("smollm2", DEMO_RUN / "final", DEMO_RUN.name)
    assert run_base(DEMO_POLICY) == "smollm2"  # what "Train DPO on these votes" trains by default


def test_the_demo_base_resolves_by_its_builtin_name_when_this_machines_path_is_gone(tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(DEMO_RUN, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "base_model": "/another/machine/.cache/tandemlm/models/smollm2-hf"}))
    assert base_ref(RunFolder(run)) == "smollm2"


def test_a_missing_demo_run_is_one_line_naming_the_script(monkeypatch, tmp_path):
    monkeypatch.setitem(DEMO_RUNS, DEMO_POLICY, tmp_path / "absent")
    with pytest.raises(EngineError, match=r"train_demo_adapter\.sh"):
        resolve_slot_model(DEMO_POLICY)


def _vllm_or_skip() -> None:
    from tandemlm.deploy import vllm_engine

    if reason := vllm_engine.unavailable_reason():
        pytest.skip(f"vLLM cannot run here: {reason}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "llama.cpp", "vllm"])
def test_the_shipped_demo_adapter_moves_the_scores_and_its_base_alone_does_not(backend):
    if backend == "vllm":
        _vllm_or_skip()
    loads: list[tuple[str, str, dict]] = []
    slots = _slots(loads, DEMO_POLICY, backend)
    try:
        policy, reference = slots["policy"].get(), slots["reference"].get()
        assert isinstance(policy, AdapterView) and policy.base is reference and policy.info.backend == backend
        assert slots["policy"].status().startswith(f"**policy**: `{DEMO_POLICY}` loaded (LoRA on `smollm2`, {backend}")
        _adapter_on_then_off(slots, "smollm2")
        assert [(m, b) for m, b, _ in loads] == [("smollm2", backend)]  # one engine, adapter on and off
    finally:
        slots["policy"]._pool.close()  # vLLM holds one engine per process: free it for the next test
