"""The transformers backend: batching, sampling, scoring and reasoning on tiny real architectures."""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest
import torch

from tandemlm.deploy.engine import collect
from tandemlm.deploy.hf_sampling import RowSampler, penalize
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import OutputConstraint, SamplingParams
from tandemlm.errors import EngineError


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
    expected = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1].gather(
        1, torch.tensor(full_ids[len(prompt_ids) :])[:, None]
    )
    assert [s for _, s in scores] == pytest.approx(expected[:, 0].tolist(), abs=1e-4)


def test_embeddings_are_the_mean_pooled_last_hidden_states(llama, tiny_llama_dir):
    """Against transformers directly: each input's last hidden states averaged and L2-normalised, whatever the
    other inputs' lengths (no padding enters a mean)."""
    import torch
    from transformers import AutoModelForCausalLM

    texts = ["Hi", "What is the capital of Peru? Answer in one short sentence."]
    token_lists = [llama.tokenize(text, add_special_tokens=True) for text in texts]
    together = llama.embed(token_lists)
    assert llama.embed(token_lists[:1])[0] == pytest.approx(together[0], abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for ids, vector in zip(token_lists, together, strict=True):
            mean = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
            assert torch.allclose(torch.tensor(vector), mean / mean.norm(), atol=1e-5)
    with pytest.raises(EngineError, match="input 1 is empty"):
        llama.embed([token_lists[0], []])


def test_r1_reasoning_reaches_messages_thinking_blocks_and_responses_reasoning_items(tiny_qwen2_dir, serve):
    """The R1-distill template opens <think>: what chat completions reports as reasoning_content comes back as
    Anthropic's thinking block and the Responses API's reasoning item, streamed or not, on transformers."""
    import anthropic
    import openai

    from tandemlm.deploy.registry import load_engine

    engine = load_engine(str(tiny_qwen2_dir), "transformers")
    conversation = [{"role": "user", "content": "Why?"}]
    try:
        with serve(engine) as url:
            oai = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
            model = oai.models.list().data[0].id
            chat = oai.chat.completions.create(model=model, messages=conversation, max_tokens=6, temperature=0).choices[0].message
            reasoning = chat.model_extra.get("reasoning_content")
            assert reasoning  # the fixture's template starts the answer inside <think>
            claude = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0, timeout=60)
            kwargs = {"model": model, "messages": conversation, "max_tokens": 6, "extra_body": {"temperature": 0}}
            message = claude.messages.create(**kwargs)
            assert message.content[0].type == "thinking" and message.content[0].thinking == reasoning
            with claude.messages.stream(**kwargs) as stream:
                assert stream.get_final_message().content[0].thinking == reasoning
            response = oai.responses.create(model=model, input=conversation, max_output_tokens=6, temperature=0)
            item = response.output[0]
            assert item.type == "reasoning" and "".join(part.text for part in item.content) == reasoning
    finally:
        engine.close()


def test_repetition_penalty_demotes_tokens_already_seen():
    # A random model never repeats itself, so check the sampler row directly.
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    history = torch.tensor([[1, 3]])
    assert RowSampler(SamplingParams(temperature=0), "cpu").sample(history, logits.clone()) == 1
    assert RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), "cpu").sample(history, logits.clone()) == 2


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


def test_close_fails_running_and_queued_requests_and_later_ones(tiny_llama_dir, close_check):
    from tandemlm.errors import EngineError

    engine = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=4)
    ids = engine.tokenize("hello there", add_special_tokens=True)
    # The second request joins the first's running batch: close() must end both mid-decode.
    close_check(
        engine, ids, SamplingParams(temperature=1.0, seed=3, max_tokens=engine.info.context_length - len(ids) - 1)
    )
    with pytest.raises(EngineError, match="closed"):
        engine.token_logprobs([{"role": "user", "content": "hi"}], "hello")


# ---- OpenAI sampling fields: log-probs, logit bias, penalties, min_p, JSON schemas ----------------
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def tokens(engine, prompt: str, params: SamplingParams) -> list:
    return list(engine.stream_tokens(engine.tokenize(prompt, add_special_tokens=True), params))


def ids(engine, prompt: str, params: SamplingParams) -> list[int]:
    return [t.token_id for t in tokens(engine, prompt, params)]


def test_a_generation_ending_on_eos_reports_the_end_token(llama, end_check):
    end_check(llama, llama.tokenize("hello there", add_special_tokens=True))


def test_the_backend_lists_every_optional_feature(llama):
    used = SamplingParams(
        min_p=0.1,
        presence_penalty=1,
        frequency_penalty=1,
        logit_bias={1: 1.0},
        logprobs=2,
        constraint=OutputConstraint(),
    ).features_used()
    assert set(used) <= llama.features and len(used) == 7


@pytest.mark.slow
def test_generated_logprobs_are_the_models_own_and_top_lists_are_sorted(llama):
    prompt = llama.tokenize("hello there", add_special_tokens=True)
    generated = list(llama.stream_tokens(prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=5)))
    target = [t.token_id for t in generated]
    assert [t.logprob for t in generated] == pytest.approx(llama.score_tokens(prompt, target), abs=1e-4)
    for token in generated:
        assert len(token.top_logprobs) == 5
        assert token.top_logprobs[0][0] == token.token_id  # greedy: the most likely token is the one sampled
        assert token.top_logprobs[0][1] == pytest.approx(token.logprob, abs=1e-6)
        values = [lp for _, lp in token.top_logprobs]
        assert values == sorted(values, reverse=True)
    # Logit bias and penalties steer sampling but never the reported log-probabilities.
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, logit_bias={target[0]: -100.0}, presence_penalty=2)
    steered = list(llama.stream_tokens(prompt, params))
    assert steered[0].token_id != target[0] and all(t.top_logprobs == [] for t in steered)
    expected = llama.score_tokens(prompt, [t.token_id for t in steered])
    assert [t.logprob for t in steered] == pytest.approx(expected, abs=1e-4)
    assert all(t.logprob is None for t in tokens(llama, "hello there", GREEDY))


@pytest.mark.slow
def test_prompt_logprobs_equal_score_tokens_with_the_top_alternatives(llama):
    prompt = llama.tokenize("The capital of France", add_special_tokens=True)
    target = llama.tokenize(" is Paris.")
    scored = llama.prompt_logprobs(prompt, target, top=3)
    assert [t.token_id for t in scored] == target
    assert [t.logprob for t in scored] == pytest.approx(llama.score_tokens(prompt, target), abs=1e-5)
    with torch.inference_mode():
        logits = llama.model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1].float()
    values, top_ids = torch.log_softmax(logits, -1).topk(3, dim=-1)
    for token, row_ids, row_values in zip(scored, top_ids.tolist(), values.tolist(), strict=True):
        assert [tid for tid, _ in token.top_logprobs] == row_ids
        assert [lp for _, lp in token.top_logprobs] == pytest.approx(row_values, abs=1e-5)
    assert all(t.top_logprobs == [] for t in llama.prompt_logprobs(prompt, target))


@pytest.mark.slow
def test_logit_bias_forces_or_bans_a_token(llama):
    greedy = ids(llama, "hello there", GREEDY)
    forced = llama.tokenize(" banana")[0]
    assert (
        ids(llama, "hello there", SamplingParams(temperature=0, max_tokens=4, logit_bias={forced: 100})) == [forced] * 4
    )
    banned = ids(llama, "hello there", SamplingParams(temperature=0, max_tokens=4, logit_bias={greedy[0]: -100}))
    assert banned[0] != greedy[0]
    with pytest.raises(EngineError, match="logit_bias"):
        llama.generate("hi", SamplingParams(logit_bias={llama.vocab_size(): 1.0}))


def test_penalize_subtracts_presence_once_and_frequency_per_occurrence():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    assert penalize(logits, counts, 0.5, 0.25).tolist() == [[1.0, 1.25, 1.75, 4.0]]
    assert penalize(logits, counts, -1.0, 0.0).tolist() == [[1.0, 3.0, 4.0, 4.0]]  # negative: encourages


def test_penalties_count_generated_tokens_only():
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0]])
    prompt_len = 2
    history = torch.tensor([[1, 1, 3]])  # token 1 only in the prompt
    params = SamplingParams(temperature=0, presence_penalty=1.0)
    assert RowSampler(params, "cpu", prompt_len).sample(history, logits.clone()) == 1
    history = torch.tensor([[0, 0, 1]])  # now token 1 was generated: 3 - 1 < 2.5
    assert RowSampler(params, "cpu", prompt_len).sample(history, logits.clone()) == 2


@pytest.mark.slow
def test_presence_and_frequency_penalties_break_a_repeating_greedy_output(llama):
    params = SamplingParams(temperature=0, max_tokens=8)
    plain = ids(llama, "hello there", params)
    assert max(plain.count(t) for t in plain) >= 3  # the random model repeats itself
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalised = ids(llama, "hello there", SamplingParams(temperature=0, max_tokens=8, **penalty))
        assert penalised != plain
        assert max(penalised.count(t) for t in penalised) < max(plain.count(t) for t in plain)


@pytest.mark.slow
def test_min_p_of_one_keeps_only_the_most_likely_token(llama):
    greedy = ids(llama, "hello there", GREEDY)
    for seed in range(3):
        assert ids(llama, "hello there", SamplingParams(temperature=1.0, min_p=1.0, seed=seed, max_tokens=8)) == greedy
    assert ids(llama, "hello there", SamplingParams(temperature=1.0, seed=0, max_tokens=8)) != greedy


SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 8},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
        "additionalProperties": False,  # else a random model invents keys with endless string values
    },
    "required and optional": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 5}},
        "required": ["ok"],
        "additionalProperties": False,
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_output_follows_a_json_schema(llama, name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = SCHEMAS[name]
    for seed in range(2):  # a random model: any token the grammar allows is as likely as the next
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120, constraint=OutputConstraint(schema))
        result = collect(llama.generate("Answer in JSON:", params))
        assert result.finish_reason == "stop", result.text  # the grammar completed, then only EOS was left
        jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.slow
def test_no_schema_means_any_json_object(llama):
    # A random model writes endless keys; favouring "}" lets it close the object at once. Words it
    # is pushed towards just as hard stay out: the grammar outranks any bias.
    close, word = llama.tokenize("}"), llama.tokenize(" hello")
    assert len(close) == len(word) == 1
    bias = {close[0]: 50.0, word[0]: 100.0}
    params = SamplingParams(temperature=0, max_tokens=10, logit_bias=bias, constraint=OutputConstraint(None))
    result = ask(llama, "hi", params)
    assert result.finish_reason == "stop" and json.loads(result.text) == {}
    assert ask(llama, "hi", SamplingParams(temperature=0, max_tokens=3, logit_bias=bias)).text == " hello" * 3


def test_a_bad_schema_is_refused_before_the_stream_starts(llama):
    with pytest.raises(EngineError, match="invalid JSON schema") as caught:
        llama.generate("hi", SamplingParams(constraint=OutputConstraint({"type": "nonsense"})))
    assert "\n" not in str(caught.value)


def test_the_grammar_never_allows_padded_vocabulary_ids(llama):
    mask = llama._grammars.matcher(OutputConstraint(None))
    allowed = mask.allowed(len(llama.tokenizer) + 64)
    assert allowed[: len(llama.tokenizer)].any() and not allowed[len(llama.tokenizer) :].any()


@pytest.mark.slow
def test_a_constrained_row_leaves_the_other_rows_of_its_batch_alone(llama):
    schema = SCHEMAS["enum"]
    requests = [
        ("a", SamplingParams(temperature=0, max_tokens=10)),
        ("hello there", SamplingParams(temperature=0, max_tokens=30, constraint=OutputConstraint(schema))),
        ("x y z", SamplingParams(temperature=1.0, seed=4, max_tokens=10)),
    ]
    solo = [ids(llama, prompt, params) for prompt, params in requests]
    batched: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(requests))
    llama.max_batch_rows = 0

    def run(i: int) -> None:
        barrier.wait()
        batched[i] = ids(llama, *requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [batched[i] for i in range(len(requests))] == solo
    assert llama.max_batch_rows >= 2
    assert json.loads(llama.detokenize(solo[1]))["color"] in ("red", "green", "blue")


@pytest.mark.slow
def test_a_row_whose_sampling_fails_ends_alone(llama, monkeypatch):
    build = llama._grammars.matcher

    def broken(constraint):
        mask = build(constraint)
        mask.consume = lambda token: (_ for _ in ()).throw(EngineError("the JSON grammar rejected token"))
        return mask

    monkeypatch.setattr(llama._grammars, "matcher", broken)
    prompt = llama.tokenize("a", add_special_tokens=True)
    healthy = SamplingParams(temperature=0, max_tokens=10)
    expected = [t.token_id for t in llama.stream_tokens(prompt, healthy)]
    # Both join the running batch; the broken row fails on its first token (in its prefill) and leaves at
    # once, so the batch never holds more than the running row and the healthy one.
    running = llama.stream_tokens(prompt, SamplingParams(temperature=0, max_tokens=20))
    next(running)
    llama.max_batch_rows = 0
    broken_stream = llama.stream_tokens(
        prompt, SamplingParams(temperature=0, max_tokens=10, constraint=OutputConstraint())
    )
    healthy_stream = llama.stream_tokens(prompt, healthy)
    list(running)
    with pytest.raises(EngineError, match="rejected"):
        list(broken_stream)
    assert [t.token_id for t in healthy_stream] == expected
    assert llama.max_batch_rows == 2


# ---- continuous batching: rows join and leave the running batch between decode steps ---------------
def no_eos(engine, max_tokens: int, **fields) -> SamplingParams:
    """Greedy for ``max_tokens`` tokens exactly: a random model could otherwise stop at any step."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias={t: -100.0 for t in engine._eos}, **fields)


def steps_with(engine, *row_ids: int) -> list[tuple[int, ...]]:
    """The logged decode steps in which every one of ``row_ids`` took part."""
    return [step for step in engine.step_log if set(row_ids) <= set(step)]


def test_a_late_request_joins_the_running_batch_and_ends_first(llama):
    prompt = llama.tokenize("hello there", add_special_tokens=True)
    long = llama.stream_tokens(prompt, no_eos(llama, 200))
    long_id = llama.rows_submitted
    next(long)  # decoding has started
    short = [t.token_id for t in llama.stream_tokens(prompt, no_eos(llama, 5))]
    short_id = llama.rows_submitted
    assert len(short) == 5
    # A static batch would decode the short request only after the long one's 200 steps.
    assert len(steps_with(llama, long_id, short_id)) >= 4  # its first token came from its own prefill
    assert len(steps_with(llama, long_id)) < 150
    long.close()  # cancels the long row


def test_rows_that_join_mid_batch_give_their_solo_greedy_tokens(llama):
    """Joins pad the running side (a longer prompt joins) and the new side (a shorter one); a long prompt
    leaving cuts the shared padding. Any slip in that bookkeeping changes the greedy tokens."""
    requests = [
        ("a", no_eos(llama, 40)),
        ("a much longer question about many things, with many words in it, " * 3, no_eos(llama, 6)),
        ("x y z", no_eos(llama, 25)),
    ]
    prompts = [llama.tokenize(text, add_special_tokens=True) for text, _ in requests]
    solo = [
        [t.token_id for t in llama.stream_tokens(p, params)] for p, (_, params) in zip(prompts, requests, strict=True)
    ]
    first = llama.rows_submitted + 1
    streams = [llama.stream_tokens(prompts[0], requests[0][1])]
    got: list[list[int]] = [[next(streams[0]).token_id]]
    for i in (1, 2):  # each one joins once the batch before it is decoding
        streams.append(llama.stream_tokens(prompts[i], requests[i][1]))
        got.append([next(streams[i]).token_id])
    for i, stream in enumerate(streams):
        got[i] += [t.token_id for t in stream]
    assert got == solo
    assert steps_with(llama, first, first + 1, first + 2)  # all three decoded together
    assert steps_with(llama, first, first + 2)[-1] == (first, first + 2)  # the long prompt left the batch


def test_a_cancelled_row_leaves_the_batch_at_once(llama):
    prompt = llama.tokenize("hello there", add_special_tokens=True)
    keep = llama.stream_tokens(prompt, no_eos(llama, 200))
    keep_id = llama.rows_submitted
    next(keep)
    cancel = threading.Event()
    dropped = llama.stream_tokens(prompt, no_eos(llama, 200), cancel)
    dropped_id = llama.rows_submitted
    next(dropped), next(dropped)  # the first from its prefill, the second from a shared decode step
    assert steps_with(llama, keep_id, dropped_id)
    cancel.set()  # from the caller's side, while it is not reading the stream
    assert len(list(dropped)) < 150  # the stream ended soon after, not after its 200 tokens
    logged = len(llama.step_log)
    deadline = time.monotonic() + 30
    while len(llama.step_log) < logged + 2 and time.monotonic() < deadline:  # steps decoded after it ended
        time.sleep(0.01)
    assert llama.step_log[-1] == (keep_id,)  # the batch shrank to the row left
    keep.close()


def test_a_cancelled_row_still_queued_ends_at_once(tiny_llama_dir):
    engine = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=1)
    try:
        prompt = engine.tokenize("hello there", add_special_tokens=True)
        running = engine.stream_tokens(prompt, no_eos(engine, 500))
        next(running)
        cancel = threading.Event()
        queued = engine.stream_tokens(prompt, no_eos(engine, 5), cancel)  # no room: it waits
        cancel.set()
        assert list(queued) == []
        assert len(engine.step_log) < 400  # answered long before the running row ends
        running.close()
    finally:
        engine.close()


def test_scoring_runs_between_decode_steps(llama):
    prompt = llama.tokenize("hello there", add_special_tokens=True)
    long = llama.stream_tokens(prompt, no_eos(llama, 200))
    long_id = llama.rows_submitted
    next(long)
    assert len(llama.score_tokens(prompt, prompt)) == len(prompt)
    assert len(steps_with(llama, long_id)) < 150  # it did not wait for the generation to end
    long.close()


def test_a_model_whose_cache_cannot_merge_keeps_static_batches(tiny_llama_dir, monkeypatch):
    from transformers import DynamicCache, MistralConfig

    from tandemlm.deploy import hf_batch

    sliding = MistralConfig(
        sliding_window=4,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert not hf_batch.Batch([], [], DynamicCache(config=sliding), torch.zeros(0, 0), []).mergeable
    monkeypatch.setattr(hf_batch.Batch, "mergeable", property(lambda self: False))
    engine = load_engine(str(tiny_llama_dir), backend="transformers", max_batch_size=4)
    try:
        prompt = engine.tokenize("hello there", add_special_tokens=True)
        solo = [t.token_id for t in engine.stream_tokens(prompt, no_eos(engine, 8))]
        first = engine.stream_tokens(prompt, no_eos(engine, 30))
        first_id = engine.rows_submitted
        next(first)
        late = [t.token_id for t in engine.stream_tokens(prompt, no_eos(engine, 8))]
        assert late == solo
        assert not steps_with(engine, first_id, engine.rows_submitted)  # it waited for the batch to end
        assert len(list(first)) == 29
    finally:
        engine.close()
