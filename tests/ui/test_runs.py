"""Run folders: a tolerant listing, plots and metrics, and loading a run's policy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tandemlm.deploy.registry import get_backend
from tandemlm.errors import EngineError
from tandemlm.ui.engines import EnginePool, EngineSlot
from tandemlm.ui.runs import list_runs, metrics_summary, resolve_model_ref
from tandemlm.ui.runs_tab import compare_runs, load_run_policy, run_names, show_run

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # header is enough here


def _make_runs(root: Path) -> Path:
    full = root / "dpo-1"
    (full / "policy").mkdir(parents=True)
    (full / "policy" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (full / "config.yaml").write_text("method: dpo\nbeta: 0.1\n")
    rows = [{"step": 1, "loss": 0.69, "kl": 0.0}, {"step": 2, "loss": 0.5, "kl": 0.2}]
    (full / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 3, "lo')
    (full / "loss.png").write_bytes(PNG)
    (full / "plots").mkdir()
    (full / "plots" / "kl.png").write_bytes(PNG)
    partial = root / "grpo-2"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1, "reward": 0.1}\n')
    (root / "notes").mkdir()  # not a run
    (root / "README.txt").write_text("hi")
    os.utime(full, (1, 1))  # older, so listed second
    return root


def test_runs_are_listed_newest_first_and_non_runs_ignored(tmp_path):
    root = _make_runs(tmp_path)
    assert run_names(str(root)) == ["grpo-2", "dpo-1"]
    assert list_runs(tmp_path / "absent") == []
    full = list_runs(root)[1]
    assert [p.name for p in full.plots] == ["loss.png", "kl.png"] and len(full.metrics) == 2


def test_show_run_gives_plots_metrics_and_config(tmp_path):
    root = _make_runs(tmp_path)
    plots, summary, config, status = show_run(str(root), "dpo-1")
    assert [caption for _, caption in plots] == ["loss", "kl"]
    assert ["loss", 0.69, 0.5, 0.5, 0.69] in summary and config.startswith("method: dpo")
    assert "2 logged steps, 2 plots, policy:" in status
    assert "no policy saved yet" in show_run(str(root), "grpo-2")[3]
    assert show_run(str(root), None)[3] == f"2 runs in `{root}`."
    assert show_run(str(tmp_path / "none"), None)[3].startswith("No runs")
    assert show_run(str(root), "deleted")[3].startswith("⚠ run `deleted` is gone")


def test_compare_runs_shows_the_table_and_figure_and_names_what_is_not_a_run(tmp_path):
    from tandemlm.align.compare import HEADERS

    root = _make_runs(tmp_path)
    ppo = root / "ppo-a"
    ppo.mkdir()
    (ppo / "config.yaml").write_text("method: ppo\nbatch_size: 4\n")
    (ppo / "run.json").write_text(json.dumps({"method": "ppo", "global_step": 2, "wall_time_s": 30.0}))
    (ppo / "metrics.jsonl").write_text('{"step": 1, "score": 0.2, "kl": 0.0}\n{"step": 2, "score": 0.4, "kl": 0.05}\n')
    table, figure, status = compare_runs(str(root), ["ppo-a", "grpo-2"])
    assert len(table) == 1 and dict(zip(HEADERS, table[0], strict=True))["samples"] == "8*"  # 2 steps × 4 prompts
    assert figure is not None and Path(figure).read_bytes()[:4] == b"\x89PNG"
    assert status.startswith("1 of 2 runs compared.") and "⚠ `grpo-2`: " in status and "is not a run folder" in status
    assert compare_runs(str(root), []) == ([], None, "Tick the runs to compare.")
    _, figure, status = compare_runs(str(root), ["notes"])
    assert figure is None and "⚠ `notes`" in status


def test_metrics_summary_ignores_non_numbers():
    assert metrics_summary([{"a": 1, "ok": True, "s": "x"}, {"a": 3}]) == [["a", 1.0, 3.0, 1.0, 3.0]]


def test_a_run_folder_resolves_to_its_policy(tmp_path):
    root = _make_runs(tmp_path)
    assert resolve_model_ref(str(root / "dpo-1")) == str(root / "dpo-1" / "policy" / "model-Q4_K_M.gguf")
    assert resolve_model_ref("smollm2") == "smollm2"
    with pytest.raises(EngineError, match="grpo-2 has no trained policy yet"):
        resolve_model_ref(str(root / "grpo-2"))


def test_tandem_align_run_layout_merged_before_final_and_adapters_need_a_merge(tmp_path):
    run = tmp_path / "dpo-lora"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"method": "dpo", "adapter": True, "base_model": "/models/base"}))
    with pytest.raises(EngineError, match=r"trained a LoRA adapter; merge it first: tandem merge .*dpo-lora"):
        resolve_model_ref(str(run))
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    assert resolve_model_ref(str(run)) == str(run / "merged")
    full = tmp_path / "sft-full"
    (full / "final").mkdir(parents=True)
    (full / "final" / "config.json").write_text("{}")
    assert resolve_model_ref(str(full)) == str(full / "final")
    reward = tmp_path / "reward-1"
    (reward / "final").mkdir(parents=True)
    (reward / "final" / "config.json").write_text("{}")
    (reward / "run.json").write_text('{"method": "reward"}')
    with pytest.raises(EngineError, match="trained a reward model, not a policy"):
        resolve_model_ref(str(reward))


def test_load_policy_button_points_the_policy_slot_at_the_run(tmp_path, make_slots):
    root = _make_runs(tmp_path)
    slots = make_slots()
    policy_box, reference_box, models, status = load_run_policy(slots, str(root), "grpo-2")
    assert (policy_box, reference_box, models) == ("pol", "ref", "") and "has no policy to load" in status
    policy_box, _, models, status = load_run_policy(slots, str(root), "dpo-1")
    # the mock loader knows no such model: the error is shown, the app goes on
    assert policy_box == str(root / "dpo-1") and "⚠" in models and status.startswith("⚠")
    assert slots["policy"].model == str(root / "dpo-1")


def test_load_policy_button_loads_the_runs_policy(tmp_path):
    root = _make_runs(tmp_path)
    loaded = []

    def loader(model: str, backend: str, **_: object):
        loaded.append(model)
        return get_backend("mock").load(None, model_id=Path(model).name)

    pool = EnginePool(loader)
    slots = {"policy": EngineSlot("policy", pool, "smollm2"), "reference": EngineSlot("reference", pool, "smollm2")}
    base = tmp_path / "base-model"
    base.mkdir()
    (root / "dpo-1" / "run.json").write_text(json.dumps({"method": "dpo", "base_model": str(base)}))
    policy_box, reference_box, models, status = load_run_policy(slots, str(root), "dpo-1")
    assert loaded == [str(root / "dpo-1" / "policy" / "model-Q4_K_M.gguf"), str(base)]  # the policy first
    assert (policy_box, reference_box) == (str(root / "dpo-1"), str(base))
    assert status == "Loaded `dpo-1` as the policy (its base model as the reference)"
    assert f"**policy**: `{root / 'dpo-1'}` loaded (mock" in models and f"`{base}` loaded (mock" in models


def test_loading_a_lora_run_with_its_base_opens_one_engine_with_the_adapter_given_at_load(tmp_path):
    """vLLM switches LoRA on only for adapters it gets at load: the policy (base + adapter) must load
    first, so the reference (the same base, adapter off) shares that engine instead of opening it bare."""
    from tandemlm.deploy.mock_engine import MockEngine
    from tandemlm.ui.engines import EnginePool, EngineSlot

    class AdapterMock(MockEngine):
        def __init__(self, adapters: dict[str, str]) -> None:
            super().__init__(model_id="base")
            self.adapters = dict(adapters)

        def loaded_adapters(self) -> list[str]:
            return list(self.adapters)

        def load_adapter(self, name: str, path: str) -> None:
            raise AssertionError("the adapter should have come with the engine's load")

    loads: list[tuple[str, dict]] = []

    def loader(model: str, backend: str, **options: object) -> AdapterMock:
        loads.append((model, dict(options)))
        return AdapterMock(options.get("adapters", {}))  # type: ignore[arg-type]

    base = tmp_path / "base"
    base.mkdir()
    run = tmp_path / "runs" / "dpo-lora"
    (run / "final").mkdir(parents=True)
    (run / "final" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("method: dpo\n")
    (run / "run.json").write_text(json.dumps({"method": "dpo", "base_model": str(base), "adapter": True, "status": "finished"}))
    pool = EnginePool(loader)
    slots = {"policy": EngineSlot("policy", pool, "x"), "reference": EngineSlot("reference", pool, "y")}
    *_, note = load_run_policy(slots, str(run.parent), run.name)
    assert note.startswith("Loaded"), note
    assert len(loads) == 1 and loads[0][0] == str(base) and list(loads[0][1]["adapters"].values()) == [run.resolve() / "final"]
    assert slots["policy"].get() is not slots["reference"].get()  # adapter view vs the base itself...
    assert slots["policy"].get().base is slots["reference"].get()  # ...on one engine


def test_a_run_whose_policy_fails_to_load_leaves_both_working_models_in_place(tmp_path):
    root = _make_runs(tmp_path)
    base = tmp_path / "base-model"
    base.mkdir()
    (root / "dpo-1" / "run.json").write_text(json.dumps({"method": "dpo", "base_model": str(base)}))

    def loader(model: str, backend: str, **_: object):
        if model.endswith(".gguf"):
            raise EngineError(f"{model} is damaged")  # the run's policy; its base would load fine
        return get_backend("mock").load(None, model_id=Path(model).name)

    pool = EnginePool(loader)
    slots = {"policy": EngineSlot("policy", pool, "pol"), "reference": EngineSlot("reference", pool, "ref")}
    working = slots["policy"].get(), slots["reference"].get()
    policy_box, reference_box, models, status = load_run_policy(slots, str(root), "dpo-1", with_base=True)
    # nothing is swapped (not even the reference to the run's base), and the boxes say so
    assert (policy_box, reference_box) == ("pol", "ref") and (slots["policy"].get(), slots["reference"].get()) == working
    assert status.startswith("⚠ ") and status.endswith("model-Q4_K_M.gguf is damaged; `pol` is still loaded")
    assert "**reference**: `ref` loaded" in models
