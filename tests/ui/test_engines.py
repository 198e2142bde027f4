"""Model slots: lazy loading, one shared engine for the same model, load errors kept as one line."""

from __future__ import annotations

import threading

import pytest

from tandemlm.deploy.load_options import LoadOptions
from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.errors import EngineError
from tandemlm.ui.engines import EnginePool, EngineSlot


class RecordingEngine(MockEngine):
    """A mock engine that remembers the chats it was asked for and whether it was closed."""

    def __init__(self, model_id: str) -> None:
        super().__init__(model_id=model_id)
        self.chats: list[list[dict]] = []
        self.closed = False

    def chat(self, messages, params):
        self.chats.append(list(messages))
        return super().chat(messages, params)

    def close(self) -> None:
        self.closed = True


class CountingLoader:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.engines: list[RecordingEngine] = []
        self.fail = fail

    def __call__(self, model: str, backend: str, **options: object) -> RecordingEngine:
        self.calls.append((model, backend, options))
        if self.fail:
            raise self.fail
        self.engines.append(RecordingEngine(model))
        return self.engines[-1]


def test_nothing_loads_until_first_use_and_the_same_model_is_loaded_once():
    loader = CountingLoader()
    pool = EnginePool(loader, LoadOptions(n_ctx=1024, n_threads=None))
    policy, reference = EngineSlot("policy", pool, "smollm2"), EngineSlot("reference", pool, "smollm2")
    assert loader.calls == [] and "loads on first use" in policy.status()
    engines = []
    threads = [threading.Thread(target=lambda s=s: engines.append(s.get())) for s in (policy, reference) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(m, b, o["load_options"].given()) for m, b, o in loader.calls] == [("smollm2", "auto", {"n_ctx": 1024})]
    assert all(e is engines[0] for e in engines)
    assert "`smollm2` loaded (mock, context 2048)" in policy.status()


def test_loading_answers_one_message_so_the_first_real_one_is_fast():
    loader = CountingLoader()
    EngineSlot("policy", EnginePool(loader), "smollm2").get()
    assert loader.engines[0].chats == [[{"role": "user", "content": "Hello"}]]


def test_switching_a_slot_closes_the_engine_only_when_no_slot_uses_it():
    loader = CountingLoader()
    pool = EnginePool(loader)
    policy, reference = EngineSlot("policy", pool, "a"), EngineSlot("reference", pool, "a")
    shared = policy.get()
    reference.get()
    policy.set("b")
    assert not shared.closed and policy.get() is not shared
    reference.set("b")
    assert shared.closed and reference.get() is policy.get()
    pool.close()
    assert all(e.closed for e in loader.engines)


def test_a_failed_load_is_one_line_in_the_status_and_can_be_retried():
    pool = EnginePool(CountingLoader(fail=ValueError("llama.cpp: failed to load model\nstack trace…")))
    slot = EngineSlot("policy", pool, "/models/broken.gguf")
    with pytest.raises(EngineError, match=r"^could not load /models/broken.gguf \(auto\): llama.cpp: failed to load model$"):
        slot.get()
    assert slot.status() == "**policy**: ⚠ could not load /models/broken.gguf (auto): llama.cpp: failed to load model"
    slot.set("smollm2")
    assert slot.error is None


def test_the_real_registry_resolves_and_reports_bad_references():
    slot = EngineSlot("reference", EnginePool(), "/no/such/model.gguf")
    with pytest.raises(EngineError, match=r"model path /no/such/model\.gguf does not exist"):
        slot.get()
    slot.set("smollm2", "no-such-backend")
    with pytest.raises(EngineError, match=r"unknown backend 'no-such-backend'; known backends: .*llama\.cpp"):
        slot.get()
    slot.set("smollm2", "mock")  # the mock backend through the real registry
    assert slot.get().info.backend == "mock"


def test_auto_never_opens_a_second_vllm_engine_and_an_explicit_one_says_what_to_do(monkeypatch):
    """vLLM serves one model per process: a second HF model goes to transformers under auto."""
    import dataclasses

    import tandemlm.deploy.auto as auto
    import tandemlm.models.resolve as resolve

    monkeypatch.setattr(auto, "choose_backend", lambda source: "vllm")  # as on a GPU with vLLM installed
    monkeypatch.setattr(resolve, "resolve_model", lambda ref, **_: ref)

    class BackendLoader(CountingLoader):
        def __call__(self, model: str, backend: str, **options: object) -> RecordingEngine:
            engine = super().__call__(model, backend, **options)
            engine.info = dataclasses.replace(engine.info, backend="vllm" if backend in ("auto", "vllm") else backend)
            return engine

    loader = BackendLoader()
    pool = EnginePool(loader)
    first, _ = pool.acquire("policy-model", "auto")
    second, _ = pool.acquire("reference-model", "auto")
    assert (first.info.backend, second.info.backend) == ("vllm", "transformers")
    assert [call[:2] for call in loader.calls] == [("policy-model", "auto"), ("reference-model", "transformers")]
    with pytest.raises(EngineError, match=r"policy-model already runs on vLLM.*load other-model with the transformers backend"):
        pool.acquire("other-model", "vllm")


@pytest.mark.gpu
def test_the_apps_pool_puts_an_hf_model_on_the_gpu_and_compares_there(tiny_llama_dir):
    """The UI on a GPU: ``auto`` loads an HF folder onto it (transformers, or vLLM when installed) in 16 bits."""
    import torch

    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.types import SamplingParams

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pool = EnginePool()
    try:
        policy, reference = EngineSlot("policy", pool, str(tiny_llama_dir)), EngineSlot("reference", pool, str(tiny_llama_dir))
        engine = policy.get()
        assert reference.get() is engine  # one engine for both sides
        if engine.info.backend == "transformers":
            assert engine.device.type == "cuda" and engine.model.dtype in (torch.bfloat16, torch.float16)
        else:
            assert engine.info.backend == "vllm"
        reply = collect(engine.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4)))
        assert reply.usage.completion_tokens > 0
    finally:
        pool.close()


class PickyLoader(CountingLoader):
    """Loads any model but ``broken.gguf``, which fails as a damaged file does; notes what was open at each load."""

    def __init__(self) -> None:
        super().__init__()
        self.open_at_load: list[list[str]] = []

    def __call__(self, model: str, backend: str, **options: object) -> RecordingEngine:
        self.open_at_load.append([e.info.model_id for e in self.engines if not e.closed])
        if model == "broken.gguf":
            raise ValueError("llama.cpp: failed to load model")
        return super().__call__(model, backend, **options)


def test_a_failed_load_keeps_the_working_model_loaded_and_says_so_in_one_line():
    loader = PickyLoader()
    slot = EngineSlot("policy", EnginePool(loader), "good")
    working = slot.load("good")
    with pytest.raises(EngineError, match=r"^could not load broken.gguf \(auto\): llama.cpp: failed to load model$"):
        slot.load("broken.gguf")
    assert slot.get() is working and not working.closed and (slot.model, slot.backend) == ("good", "auto")
    assert slot.status() == (
        "**policy**: ⚠ could not load broken.gguf (auto): llama.cpp: failed to load model; "
        "`good` is still loaded (mock, context 2048)"
    )
    newer = slot.load("better")  # the next good Load swaps, and only once the new model is in
    assert loader.open_at_load[-1] == ["good"] and working.closed and slot.get() is newer
    assert slot.status() == "**policy**: `better` loaded (mock, context 2048)"


def test_a_failed_load_with_nothing_loaded_names_the_new_model_and_its_error():
    slot = EngineSlot("policy", EnginePool(PickyLoader()), "good")
    with pytest.raises(EngineError):
        slot.load("broken.gguf")
    assert slot.model == "broken.gguf" and not slot.loaded and slot.failed is None
    assert slot.status() == "**policy**: ⚠ could not load broken.gguf (auto): llama.cpp: failed to load model"


def test_the_load_button_keeps_the_working_model_on_a_bad_path_or_backend(make_slots):
    """The panel's handler, through the real registry for the backend: the old model still answers."""
    from tandemlm.deploy.engine import collect
    from tandemlm.deploy.types import SamplingParams
    from tandemlm.ui.models_panel import load_slot

    slots = make_slots()
    assert "**policy**: `pol` loaded" in load_slot(slots, "policy", "pol", "auto")
    status = load_slot(slots, "policy", "/no/such/model.gguf", "auto")
    policy_line = status.split("  \n")[0]
    assert policy_line == "**policy**: ⚠ model path /no/such/model.gguf does not exist; `pol` is still loaded (mock, context 2048)"
    reply = collect(slots["policy"].get().chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=8)))
    assert reply.text == "hello"
    assert "⚠ type a policy model" in load_slot(slots, "policy", "  ", "auto") and slots["policy"].loaded

    registry = EngineSlot("reference", EnginePool(), "smollm2", "mock")
    working = registry.load("smollm2", "mock")
    with pytest.raises(EngineError, match=r"^could not load smollm2 \(no-such-backend\): unknown backend 'no-such-backend'"):
        registry.load("smollm2", "no-such-backend")
    assert registry.get() is working and registry.status().endswith("; `smollm2` is still loaded (mock, context 2048)")


def test_a_slots_own_vllm_engine_closes_before_the_next_vllm_model_and_comes_back_if_that_fails(monkeypatch):
    """vLLM serves one model per process: trying the new model beside the old one would put it on transformers."""
    import dataclasses

    import tandemlm.deploy.auto as auto
    import tandemlm.models.resolve as resolve

    monkeypatch.setattr(auto, "choose_backend", lambda source: "vllm")  # as on a GPU with vLLM installed
    monkeypatch.setattr(resolve, "resolve_model", lambda ref, **_: ref)

    class VllmLoader(PickyLoader):
        def __call__(self, model: str, backend: str, **options: object) -> RecordingEngine:
            engine = super().__call__(model, backend, **options)
            engine.info = dataclasses.replace(engine.info, backend="vllm" if backend in ("auto", "vllm") else backend)
            return engine

    loader = VllmLoader()
    pool = EnginePool(loader)
    policy, reference = EngineSlot("policy", pool, "a"), EngineSlot("reference", pool, "b", "transformers")
    first, _ = policy.get(), reference.get()
    second = policy.load("c")
    assert loader.open_at_load[-1] == ["b"] and first.closed and second.info.backend == "vllm"
    with pytest.raises(EngineError, match=r"^could not load broken\.gguf \(vllm\)"):
        policy.load("broken.gguf", "vllm")
    assert second.closed and loader.open_at_load[-2:] == [["b"], ["b"]]  # tried with c closed, then c again
    assert loader.calls[-1][:2] == ("c", "auto")
    assert policy.model == "c" and policy.get().info.backend == "vllm" and not policy.get().closed
    assert policy.status().endswith("; `c` is still loaded (vllm, context 2048)")


def test_a_flag_the_slots_backend_does_not_use_is_refused_in_one_line_before_loading(tiny_llama_dir):
    """`tandem ui --n-gpu-layers 3` with a transformers slot: the slot says which flag and backend, nothing loads."""
    pool = EnginePool(load_options=LoadOptions(n_gpu_layers=3))
    slot = EngineSlot("policy", pool, str(tiny_llama_dir), backend="transformers")
    with pytest.raises(EngineError, match=r"--n-gpu-layers is not used by the transformers backend"):
        slot.get()
    assert "\n" not in str(slot.error or "")
