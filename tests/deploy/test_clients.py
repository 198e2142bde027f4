"""The real clients people point at a local ``tandem serve``, used unchanged against the built-in model.

Each test drives one client library exactly as its users do: the official ``openai`` SDK,
LangChain's ``ChatOpenAI``, ``litellm`` and lm-evaluation-harness (``local-completions`` for
loglikelihood tasks, ``local-chat-completions`` for generation). The server runs the built-in
SmolLM2-135M-Instruct on the llama.cpp backend; the lm-eval tasks live in ``tests/data/lm_eval``.
Expectations follow the OpenAI API reference, not what the server happens to do today.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.slow

LM_EVAL_TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
FRANCE = "What is the capital of France? Answer in one short sentence."
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class Capital(BaseModel):
    """A country's capital (the structured-output schema)."""

    city: str
    country: str


class get_weather(BaseModel):  # the class name is the tool's name
    """Current weather of a city."""

    city: str


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def smollm2():
    """The built-in SmolLM2 on llama.cpp (test_llamacpp_engine.py loads its own, module-scoped: one at a time)."""
    from tandemlm.deploy.registry import load_engine

    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def live(serve, smollm2) -> Any:
    """(base URL ending in /v1, the served model id) of a live server for the built-in model."""
    with serve(smollm2) as url:
        model_id = sdk(url).models.list().data[0].id
        yield url, model_id


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


# ---- LangChain ------------------------------------------------------------------------------------
def chat_openai(live: Any, **options: Any) -> Any:
    from langchain_openai import ChatOpenAI

    url, model_id = live
    return ChatOpenAI(base_url=url, api_key="x", model=model_id, max_retries=0, timeout=120, **options)


def test_langchain_invoke_answers(live):
    reply = chat_openai(live, temperature=0, max_tokens=32).invoke(FRANCE)
    assert "Paris" in reply.content
    assert reply.response_metadata["finish_reason"] == "stop"
    usage = reply.usage_metadata
    assert usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_langchain_stream_gives_pieces_that_add_up_to_the_whole_answer(live):
    llm = chat_openai(live, temperature=0, max_tokens=32)
    chunks = list(llm.stream(FRANCE))
    streamed = "".join(chunk.content for chunk in chunks)
    assert len([c for c in chunks if c.content]) > 1  # really streamed, not one blob
    assert "Paris" in streamed
    assert streamed == llm.invoke(FRANCE).content  # greedy: the same answer either way


def test_langchain_structured_output_in_default_json_schema_mode(live):
    structured = chat_openai(live, temperature=0, max_tokens=64).with_structured_output(Capital)
    result = structured.invoke("What is the capital of France? Give the city and the country.")
    assert isinstance(result, Capital)


def test_langchain_forced_tool_call_has_parsed_arguments(live):
    llm = chat_openai(live, temperature=0, max_tokens=64).bind_tools([get_weather], tool_choice="get_weather")
    reply = llm.invoke("What is the weather like in Paris?")
    assert reply.tool_calls, reply
    call = reply.tool_calls[0]
    assert call["name"] == "get_weather"
    assert isinstance(call["args"], dict) and isinstance(call["args"].get("city"), str)
    assert call["id"]
    assert not reply.invalid_tool_calls


# ---- litellm --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm_completion(live):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    import litellm

    url, model_id = live

    def completion(**kwargs: Any) -> Any:
        return litellm.completion(model=f"openai/{model_id}", api_base=url, api_key="x", timeout=120, **kwargs)

    return completion


def test_litellm_plain_completion(litellm_completion):
    result = litellm_completion(messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=32)
    assert "Paris" in result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens > 0


def test_litellm_streaming_matches_the_plain_answer(litellm_completion):
    messages = [{"role": "user", "content": FRANCE}]
    chunks = list(litellm_completion(messages=messages, temperature=0, max_tokens=32, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in streamed
    assert streamed == litellm_completion(messages=messages, temperature=0, max_tokens=32).choices[0].message.content


def test_litellm_forced_tool_call(litellm_completion):
    result = litellm_completion(
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=64,
    )
    calls = result.choices[0].message.tool_calls
    assert calls, result
    assert calls[0].function.name == "get_weather" and calls[0].id
    arguments = json.loads(calls[0].function.arguments)
    assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str)
    assert set(arguments) == {"city"}  # the tool lists only city: the grammar allows no invented key


def test_a_forced_call_cut_by_max_tokens_is_a_partial_call_not_text(live):
    url, model_id = live
    result = sdk(url).chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=8,  # far fewer than the shortest whole call takes, whatever the weights
    )
    choice = result.choices[0]
    assert choice.finish_reason == "length" and result.usage.completion_tokens == 8
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert call.function.arguments == "" or call.function.arguments.startswith("{")


# ---- openai SDK -----------------------------------------------------------------------------------
def test_openai_parse_returns_the_pydantic_object(live):
    url, model_id = live
    result = sdk(url).chat.completions.parse(
        model=model_id,
        messages=[{"role": "user", "content": "What is the capital of France? Give the city and the country."}],
        response_format=Capital,
        temperature=0,
        max_tokens=64,
    )
    message = result.choices[0].message
    assert isinstance(message.parsed, Capital), message
    assert message.refusal is None


def test_openai_chat_logprobs_with_top_alternatives(live):
    url, model_id = live
    result = sdk(url).chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=3,
    )
    choice = result.choices[0]
    entries = choice.logprobs.content
    assert entries, choice
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and math.isfinite(entry.logprob)
        assert entry.token == bytes(entry.bytes).decode("utf-8", "replace")
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy decoding picks the most likely token, so it heads its own alternatives.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_openai_n2_gives_two_indexed_choices(live):
    url, model_id = live
    result = sdk(url).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": FRANCE}], temperature=1.0, seed=7, max_tokens=16, n=2
    )
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in result.choices)
    assert result.usage.completion_tokens >= 2


# ---- lm-evaluation-harness ------------------------------------------------------------------------
def tokenizer_folder() -> Path:
    """A local HF tokenizer of the served model (lm-eval needs one for loglikelihood; no hub here)."""
    from tandemlm.models.builtin import builtin_hf_folder

    return builtin_hf_folder("smollm2")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.13's TemplateLM._encode_pair for a causal model (no special tokens)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids) :]


def mc_docs() -> list[dict[str, Any]]:
    lines = (LM_EVAL_TASKS / "capitals_mc.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def engine_scores(smollm2) -> list[list[float]]:
    """Each question's choice log-likelihoods, scored by the engine itself on lm-eval's token split."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    scores = []
    for doc in mc_docs():
        row = []
        for choice in doc["choices"]:
            context_ids, continuation_ids = encode_pair(tokenizer, doc["question"], " " + choice)
            row.append(sum(smollm2.score_tokens(context_ids, continuation_ids)))
        scores.append(row)
    return scores


def test_the_local_tokenizer_lm_eval_uses_matches_the_engines(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    for doc in mc_docs():
        for choice in doc["choices"]:
            text = f"{doc['question']} {choice}"
            assert tokenizer(text, add_special_tokens=False).input_ids == smollm2.tokenize(text), text


def run_lm_eval(monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(LM_EVAL_TASKS)  # the task YAMLs name their data files relative to their folder
    return lm_eval.simple_evaluate(task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)), log_samples=True, **kwargs)


@pytest.mark.parametrize(
    "extra",
    # Token-id prompts one at a time (the default) and in lists (batch_size > 1); text prompts take
    # the same server path as token ids after tokenizing (tests/deploy/test_server_api.py).
    [{}, {"batch_size": 4}, {"tokenizer_backend": "remote", "tokenizer": None}],
    ids=["default", "batch_size=4", "server-tokenizer"],
)
def test_lm_eval_local_completions_multiple_choice_matches_engine_scoring(live, offline, monkeypatch, engine_scores, extra):
    url, model_id = live
    model_args = {
        "model": model_id,
        "base_url": f"{url}/completions",
        "tokenizer": str(tokenizer_folder()),
        "tokenizer_backend": "huggingface",
        **extra,
    }
    model_args = {key: value for key, value in model_args.items() if value is not None}  # remote: no local tokenizer
    out = run_lm_eval(monkeypatch, model="local-completions", model_args=model_args, tasks=["tandem_capitals_mc"])

    docs = mc_docs()
    expected_acc = sum(max(range(len(row)), key=row.__getitem__) == doc["answer"] for row, doc in zip(engine_scores, docs, strict=True)) / len(docs)
    assert out["results"]["tandem_capitals_mc"]["acc,none"] == pytest.approx(expected_acc)
    samples = sorted(out["samples"]["tandem_capitals_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for sample, row in zip(samples, engine_scores, strict=True):
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(row, abs=1e-2), sample["doc"]


def test_lm_eval_local_chat_completions_generation_gives_a_score(live, offline, monkeypatch):
    url, model_id = live
    out = run_lm_eval(
        monkeypatch,
        model="local-chat-completions",
        model_args={"model": model_id, "base_url": f"{url}/chat/completions"},
        tasks=["tandem_capitals_gen"],
        apply_chat_template=True,
    )
    score = out["results"]["tandem_capitals_gen"]["exact_match,none"]
    assert 0.0 <= float(score) <= 1.0
    answers = [sample["resps"][0][0] for sample in out["samples"]["tandem_capitals_gen"]]
    assert len(answers) == 6 and any(a.strip() for a in answers), answers


# ---- a continuation the model ends right after (lm-eval's log-likelihood request, issue 22) ---------
ENDED = [  # (question, answers): greedy SmolLM2 ends its turn right after most of these answers
    ("What is the capital of France?", ["The capital of France is Paris.", "The capital of France is London.", "Berlin"]),
    ("What is 2+2?", ["2 + 2 = 4.", "Five.", "4"]),
]


def chat_context(question: str) -> str:
    """A user turn and the opening of the assistant's, in SmolLM2's format (no system prompt: short)."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def end_token(engine: Any) -> int:
    (eos,) = engine.tokenize(engine.special_tokens()["eos_token"])
    return eos


def scored_in_one_pass(engine: Any, ids: list[int]) -> list[Any]:
    """Each token of ``ids`` after the first scored (with its best alternative) in one pass over the whole
    sequence, as the server scores an echoed prompt: llama.cpp's CPU flash attention gives slightly
    different numbers over a prefix cached in another layout, so no cached prefix is used."""
    return engine.prompt_logprobs(ids[:1], ids[1:], top=1)


def test_an_echoed_prompt_followed_by_the_end_token_keeps_it_in_the_logprobs(live, smollm2):
    url, model_id = live
    context = smollm2.tokenize(chat_context(ENDED[0][0]))
    ids = smollm2.tokenize(chat_context(ENDED[0][0]) + ENDED[0][1][0])
    eos = end_token(smollm2)
    *prompt, end = scored_in_one_pass(smollm2, [*ids, eos])
    assert end.top_logprobs[0][0] == eos  # the case under test: greedy decoding ends right here
    result = sdk(url).completions.create(model=model_id, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and result.usage.completion_tokens == 0  # the answer's tokens: none
    assert choice.text == smollm2.detokenize(ids)  # the end token's text is left out
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.tokens[-1] == ""
    assert logprobs.token_logprobs[-1] == pytest.approx(end.logprob, abs=1e-3)
    # lm-eval's slice [ctxlen:-1] is the continuation, all of it
    continuation = [record.logprob for record in prompt[len(context) - 1 :]]
    assert logprobs.token_logprobs[len(context) : -1] == pytest.approx(continuation, abs=1e-3)


def write_ended_task(folder: Path) -> list[dict[str, Any]]:
    """A multiple-choice task over chat-formatted questions (the ENDED answers) in ``folder``; its docs."""
    docs = [{"question": chat_context(q), "choices": answers, "answer": 0} for q, answers in ENDED]
    (folder / "ended_mc.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task = (LM_EVAL_TASKS / "tandem_capitals_mc.yaml").read_text()
    task = task.replace("tandem_capitals_mc", "tandem_ended_mc").replace("capitals_mc.jsonl", "ended_mc.jsonl")
    (folder / "tandem_ended_mc.yaml").write_text(task.replace('target_delimiter: " "', 'target_delimiter: ""'))
    return docs


def test_lm_eval_scores_continuations_the_model_ends_after_as_the_engine_does(live, smollm2, offline, monkeypatch, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    url, model_id = live
    docs = write_ended_task(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    expected, ended, eos = [], 0, end_token(smollm2)
    for doc in docs:
        row = []
        for context, continuation in (encode_pair(tokenizer, doc["question"], choice) for choice in doc["choices"]):
            *scored, end = scored_in_one_pass(smollm2, [*context, *continuation, eos])
            row.append(sum(record.logprob for record in scored[len(context) - 1 :]))
            ended += end.top_logprobs[0][0] == eos
        expected.append(row)
    assert ended >= 3  # some continuations are followed at once by the end token

    monkeypatch.chdir(tmp_path)
    model_args = {"model": model_id, "base_url": f"{url}/completions", "tokenizer": str(tokenizer_folder())}
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=["tandem_ended_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )
    samples = sorted(out["samples"]["tandem_ended_mc"], key=lambda s: s["doc_id"])
    for sample, row in zip(samples, expected, strict=True):
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(row, abs=1e-2), sample["doc"]


# ---- embeddings --------------------------------------------------------------------------------------------------
EMBED_TEXTS = ["The capital of France is Paris.", "Paris is the capital city of France.", "def add(a, b): return a + b"]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def hf_mean_pooled(smollm2) -> list[list[float]]:
    """An independent computation: transformers' last hidden states of the HF copy, averaged, L2-normalised."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandemlm.align.model import base_folder

    model = AutoModelForCausalLM.from_pretrained(base_folder("smollm2"), dtype=torch.float32).eval()
    vectors = []
    with torch.no_grad():
        for text in EMBED_TEXTS:
            ids = torch.tensor([smollm2.tokenize(text, add_special_tokens=True)])
            mean = model.model(input_ids=ids).last_hidden_state[0].mean(0)
            vectors.append((mean / mean.norm()).tolist())
    return vectors


def test_openai_embeddings_match_an_independent_mean_pooling(live, smollm2, hf_mean_pooled):
    """The openai SDK (base64 on the wire by default) gets unit vectors equal to the engine's own and, within
    the GGUF's quantization, to transformers' mean-pooled hidden states of the same model."""
    url, model_id = live
    result = sdk(url).embeddings.create(model=model_id, input=EMBED_TEXTS)
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2] and len(vectors[0]) == 576
    tokens = [smollm2.tokenize(text, add_special_tokens=True) for text in EMBED_TEXTS]
    assert result.usage.prompt_tokens == sum(len(t) for t in tokens)
    for served, engine, reference in zip(vectors, smollm2.embed(tokens), hf_mean_pooled, strict=True):
        assert _dot(served, served) == pytest.approx(1.0, abs=1e-5)
        assert max(abs(a - b) for a, b in zip(served, engine, strict=True)) < 1e-5  # float32 on the wire
        assert _dot(served, reference) > 0.999  # measured 0.9997-0.9999 for the Q4_1 GGUF
    assert _dot(vectors[0], vectors[1]) > _dot(vectors[0], vectors[2]) + 0.2  # a paraphrase is nearer than code


def test_embeddings_take_token_ids_and_floats_and_refuse_what_they_cannot_honour(live, smollm2):
    url, model_id = live
    ids = smollm2.tokenize(EMBED_TEXTS[0], add_special_tokens=True)
    by_ids = httpx.post(f"{url}/embeddings", json={"model": model_id, "input": [ids], "encoding_format": "float"}, timeout=120)
    by_text = httpx.post(f"{url}/embeddings", json={"model": model_id, "input": EMBED_TEXTS[0], "encoding_format": "float"}, timeout=120)
    assert by_ids.status_code == by_text.status_code == 200
    assert by_ids.json()["data"][0]["embedding"] == by_text.json()["data"][0]["embedding"]
    refused = httpx.post(f"{url}/embeddings", json={"model": model_id, "input": "hi", "dimensions": 64}, timeout=30)
    assert refused.status_code == 400 and "dimensions is not supported" in refused.json()["error"]["message"]
    empty = httpx.post(f"{url}/embeddings", json={"model": model_id, "input": []}, timeout=30)
    assert empty.status_code == 400 and "input must not be empty" in empty.json()["error"]["message"]
    long = httpx.post(f"{url}/embeddings", json={"model": model_id, "input": [[1] * 3000]}, timeout=30)
    assert long.status_code == 400 and "embeddings take at most 2048" in long.json()["error"]["message"]
