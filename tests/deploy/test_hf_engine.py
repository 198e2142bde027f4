"""The transformers backend: batching, sampling, scoring and reasoning on tiny real architectures."""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from tandemlm.deploy.engine import collect
from tandemlm.deploy.hf_engine import _RowSampler
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    engine = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=4)
    yield engine
    engine.close()


def ask(engine, text: str, params: SamplingParams):
    return collect(engine.chat([{"role": "user", "content": text}], params))


def test_concurrent_requests_share_a_batch_and_match_solo_runs(llama):
    prompts = ["a", "a much longer question about many things", "hello there", "x y z"]
    params = SamplingParams(temperature=0, max_tokens=10)
    solo = [ask(llama, p, params).text for p in prompts]
    batched: dict[int, str] = {}
    barrier = threading.Barrier(len(prompts))
    llama.max_batch_rows = 0

    def run(i: int) -> None:
        barrier.wait()
        batched[i] = ask(llama, prompts[i], params).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [batched[i] for i in range(len(prompts))] == solo
    assert llama.max_batch_rows >= 2  # they were decoded together, not one after another


def test_seeded_sampling_is_reproducible(llama):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3, max_tokens=8)
    first, again = ask(llama, "hi", params).text, ask(llama, "hi", params).text
    assert first == again
    others = {ask(llama, "hi", SamplingParams(temperature=1.0, seed=s, max_tokens=8)).text for s in range(5)}
    assert len(others) > 1


def test_token_logprobs_match_a_direct_forward_pass(llama):
    messages = [{"role": "user", "content": "hi"}]
    scores = llama.token_logprobs(messages, "Hello!")
    prompt_ids = llama.tokenize(llama.render_chat(messages))
    full_ids = llama.tokenize(llama.render_chat(messages) + "Hello!")
    with torch.inference_mode():
        logits = llama.model(torch.tensor([full_ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1].gather(1, torch.tensor(full_ids[len(prompt_ids) :])[:, None])
    assert [s for _, s in scores] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)


def test_repetition_penalty_demotes_tokens_already_seen():
    # A random model never repeats itself, so check the sampler row directly.
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    history = torch.tensor([[1, 3]])
    assert _RowSampler(SamplingParams(temperature=0), "cpu").sample(history, logits.clone()) == 1
    assert _RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), "cpu").sample(history, logits.clone()) == 2


def test_r1_template_reasoning_is_split_from_the_answer(tiny_qwen2_dir):
    engine = load_engine(str(tiny_qwen2_dir), backend="transformers")
    try:
        prompt = engine.render_chat([{"role": "user", "content": "2+2?"}])
        assert prompt.rstrip().endswith("<think>")
        result = ask(engine, "2+2?", SamplingParams(temperature=0, max_tokens=8))
        # A random model never closes the think block, so everything it says is reasoning.
        assert result.reasoning and not result.text
    finally:
        engine.close()


def test_cpu_load_is_fp32_with_sdpa_even_for_a_bf16_request_left_auto(tiny_llama_dir):
    engine = load_engine(str(tiny_llama_dir), backend="transformers")
    try:
        assert engine.model.dtype == torch.float32
        assert engine.model.config._attn_implementation == "sdpa"
    finally:
        engine.close()


@pytest.mark.gpu
def test_auto_dtype_on_gpu_is_16_bit_for_an_fp32_checkpoint(tiny_llama_dir):
    """The fixture's config.json says float32: "auto" must not hand FlashAttention-2 an fp32 model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = load_engine(str(tiny_llama_dir), backend="transformers")
    try:
        assert engine.model.dtype in (torch.bfloat16, torch.float16)
        flash = importlib.util.find_spec("flash_attn") is not None
        assert engine.model.config._attn_implementation == ("flash_attention_2" if flash else "sdpa")
        assert ask(engine, "hi", SamplingParams(temperature=0, max_tokens=4)).usage.completion_tokens > 0
    finally:
        engine.close()


@pytest.mark.gpu
def test_flash_attention_2_used_on_gpu_when_installed(tiny_llama_dir):
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = load_engine(str(tiny_llama_dir), backend="transformers", dtype="bfloat16")
    try:
        assert engine.model.config._attn_implementation == "flash_attention_2"
        assert ask(engine, "hi", SamplingParams(temperature=0, max_tokens=4)).usage.completion_tokens > 0
    finally:
        engine.close()


def test_close_fails_running_and_queued_requests_and_later_ones(tiny_llama_dir):
    """close() answers every caller with an EngineError (none left blocked) and refuses new work."""
    from tandemlm.errors import EngineError

    engine = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=4)
    ids = engine.tokenize("hello there", add_special_tokens=True)
    # A static batch runs to its end before the next starts, so the second request waits in the queue.
    long = SamplingParams(temperature=1.0, seed=3, max_tokens=engine.info.context_length - len(ids) - 1)
    started, submitted = threading.Event(), threading.Event()
    errors: dict[str, BaseException | None] = {}

    def running() -> None:
        try:
            for _ in engine.stream_tokens(ids, long):
                started.set()
            errors["running"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["running"] = exc

    def queued() -> None:
        try:
            stream = engine.stream_tokens(ids, long)
            submitted.set()
            list(stream)
            errors["queued"] = None
        except BaseException as exc:  # noqa: BLE001 - recorded for the asserts below
            errors["queued"] = exc

    threads = [threading.Thread(target=running, daemon=True), threading.Thread(target=queued, daemon=True)]
    threads[0].start()
    assert started.wait(60)
    threads[1].start()
    assert submitted.wait(10)
    engine.close()
    for thread in threads:
        thread.join(timeout=10)  # a liveness check: a caller left blocked would hang here
    assert not any(thread.is_alive() for thread in threads), "a caller was left blocked after close()"
    for name in ("running", "queued"):
        assert isinstance(errors[name], EngineError) and "closed" in str(errors[name]), (name, errors[name])
    with pytest.raises(EngineError, match="closed"):
        engine.stream_tokens(ids, long)
    with pytest.raises(EngineError, match="closed"):
        engine.token_logprobs([{"role": "user", "content": "hi"}], "hello")
    engine.close()  # a second close is harmless
