"""The llama.cpp backend's split KV layout (``--kv-layout split``): one KV stream per slot, as llama-server -np.

Each slot holds n_ctx / n_parallel cells and a request larger than that is refused naming the layout; a running
request's prompt is still shared with a newcomer (llama.cpp copies the stream) and decodes as the prompt alone
does; concurrent streams decode as each does alone; a batch lists its streams in sequence order (llama.cpp cuts a
ubatch wherever they do not run on by one); the prompt cache restores into another stream.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from tandemlm.deploy.engine import collect
from tandemlm.deploy.llamacpp_engine import kv_split
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError

# As in tests/deploy/test_llamacpp_engine.py: cached cells and other batch shapes round differently on the CPU.
LOGPROB_TOLERANCE = 0.3
SCORED = SamplingParams(temperature=0, max_tokens=1, logprobs=5)


@pytest.fixture(scope="module")
def split_engine():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=2, kv_layout="split")
    yield engine
    engine.close()


def _assert_close(alone: dict[str, float], other: dict[str, float]) -> None:
    common = alone.keys() & other.keys()
    assert len(common) >= 3, (alone, other)
    assert max(abs(alone[t] - other[t]) for t in common) <= LOGPROB_TOLERANCE, (alone, other)


def test_a_bad_layout_or_too_small_a_share_fails_in_one_line():
    with pytest.raises(EngineError, match=r"^--kv-layout 'paged' is not a layout: it takes unified or split$"):
        kv_split("paged", 4096, 8)
    with pytest.raises(EngineError, match=r"gives each of the 8 slots 32 of the 256 context cells.*raise --n-ctx"):
        kv_split("split", 256, 8)
    assert kv_split("split", 4096, 8) and not kv_split("unified", 256, 8)


def test_each_slot_holds_its_share_and_a_larger_request_is_refused_naming_the_layout(split_engine):
    assert split_engine.info.context_length == 1024  # 2048 cells split over 2 slots (the scoring stream has its own)
    with pytest.raises(EngineError, match="context window is 1024 tokens"):
        collect(split_engine.chat([{"role": "user", "content": "hello " * 1100}], SamplingParams()))
    prompt = split_engine.tokenize(" ".join(["word"] * 1000))
    with pytest.raises(EngineError, match="needs 1100 tokens but a slot of --kv-layout split holds 1024"):
        list(split_engine.stream_tokens(prompt, SamplingParams(temperature=0, max_tokens=100)))
    assert split_engine.open_ended_budget(1000) == 24  # the rest of its own slot


def test_a_running_prefix_is_copied_to_another_stream_and_decodes_as_the_prompt_alone(
    split_engine, long_prompt, first_token_top
):
    messages = long_prompt(split_engine, 600)
    split_engine.drop_cached_prompts()
    alone = first_token_top(collect(split_engine.chat(messages, SCORED)))
    split_engine.drop_cached_prompts()  # only the running request can give its prefix now
    prompt_len = len(split_engine.tokenize(split_engine.render_chat(messages)))
    first = split_engine.chat(messages, SamplingParams(temperature=0, max_tokens=24))
    next(first)  # decoding: its whole prompt is in its stream
    prefilled, shared_before = split_engine.prefilled_tokens, split_engine.shared_prefix_tokens
    shared = first_token_top(collect(split_engine.chat(messages, SCORED)))
    collect(first)
    assert split_engine.shared_prefix_tokens - shared_before == prompt_len - 1
    assert split_engine.prefilled_tokens - prefilled <= 2  # one token, not 600
    _assert_close(alone, shared)


def test_concurrent_streams_decode_as_each_does_alone(split_engine, first_token_top):
    prompts = [[{"role": "user", "content": f"Tell me a fact about the number {n}. Answer in one short sentence."}]
               for n in (3, 7, 12)]
    split_engine.drop_cached_prompts()
    alone = [first_token_top(collect(split_engine.chat(m, SCORED))) for m in prompts]
    split_engine.drop_cached_prompts()
    together: list[dict[str, float]] = [{} for _ in prompts]

    def run(i: int) -> None:
        together[i] = first_token_top(collect(split_engine.chat(prompts[i], SCORED)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert split_engine.max_sequences_per_step >= 2
    for a, b in zip(alone, together, strict=True):
        _assert_close(a, b)


def test_a_batch_lists_its_streams_in_sequence_order_decoding_first_in_the_budget(split_engine):
    def request(seq: int, prefill: int = 0) -> SimpleNamespace:
        return SimpleNamespace(seq_id=seq, prefilling=bool(prefill), prompt=[1] * prefill, n_past=0)

    active = [request(2), request(0, prefill=600), request(1)]
    plan = split_engine._plan_step(active)
    assert [(item[0].seq_id, item[2]) for item in plan] == [(0, split_engine._n_batch - 2), (1, 0), (2, 0)]


def test_the_prompt_cache_restores_a_conversation_into_another_stream(split_engine, first_token_top):
    turn = [{"role": "system", "content": "You answer briefly. " * 20},
            {"role": "user", "content": "Name three fruits. Answer in one short sentence."}]
    split_engine.drop_cached_prompts()
    prompt_len = len(split_engine.tokenize(split_engine.render_chat(turn)))
    cold = first_token_top(collect(split_engine.chat(turn, SCORED)))
    split_engine.drop_cached_prompts(keep_in_ram=True)  # as if other requests had taken every stream
    restored, prefilled = split_engine.restored_tokens, split_engine.prefilled_tokens
    again = first_token_top(collect(split_engine.chat(turn, SCORED)))
    assert split_engine.restored_tokens - restored == prompt_len - 1
    assert split_engine.prefilled_tokens - prefilled == 1
    _assert_close(cold, again)


def test_speculative_decoding_in_the_split_layout_gives_plain_decodings_tokens(split_engine):
    """Drafts make a stream carry several tokens in a step (llama.cpp cuts extra ubatches) and rejected ones leave
    its stream; the tokens and log-probs stay plain greedy decoding's (under 512 cells both take the same
    flash-attention path)."""
    record = 'Rewrite this JSON with the age set to 37: {"name": "Ada", "age": 36, "city": "London", "tags": ["math", "code"]}'
    messages = [{"role": "user", "content": record}]
    params = SamplingParams(temperature=0, max_tokens=40, logprobs=1)
    split_engine.drop_cached_prompts()  # both prefill cold: cached cells round differently
    plain = collect(split_engine.chat(messages, params))
    speculative = load_engine(
        "smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=2, kv_layout="split", speculative="ngram"
    )
    try:
        drafted = collect(speculative.chat(messages, params))
        accepted, drafts = speculative.spec_accepted_tokens, speculative.spec_draft_tokens
        assert 10 <= accepted < drafts  # much of the record is copied from the prompt, and some drafts are rejected
    finally:
        speculative.close()
    assert [(r.token, r.logprob) for r in drafted.logprobs] == [(r.token, r.logprob) for r in plain.logprobs]
