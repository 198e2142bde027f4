"""The llama.cpp backend's prompt cache beyond the slots: saved sequence states restored into any sequence.

The pure :class:`PromptCache` is checked on hand-made entries; the engine on the built-in model: a
conversation's second turn after other requests took every sequence prefills only what is new and
decodes what the same turn decodes from its own idle sequence (same cells, so the same log-probs), the
RAM budget evicts least recently used, and the server's ``/metrics`` shows the prefilled tokens.
"""

from __future__ import annotations

import threading

import httpx
import pytest
from openai import OpenAI

from tandemlm.deploy.engine import collect
from tandemlm.deploy.llamacpp_prompt_cache import PromptCache
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.scheduling import common_prefix_len
from tandemlm.deploy.types import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
TURN1 = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly. " * 6},
    {"role": "user", "content": "Name three fruits. Answer in one short sentence."},
]
# How far a cold prefill's log-probs may be from a continuation from cached cells (flash attention sums the
# cells in another order; README and tests/deploy/test_llamacpp_engine.py state the same bound).
CACHED_LOGPROB_TOLERANCE = 0.3


# ---- the cache itself --------------------------------------------------------------------------
def test_the_longest_shared_prefix_wins_and_only_under_its_own_adapter():
    cache = PromptCache(budget_bytes=1000)
    cache.add([1, 2, 3], None, b"a" * 10)
    cache.add([1, 2, 3, 4, 5, 6], "policy", b"b" * 10)
    cache.add([1, 2, 9], None, b"c" * 10)
    saved, common = cache.best([1, 2, 3, 4, 5, 7], None, limit=10)
    assert saved is not None and saved.state == b"a" * 10 and common == 3  # the adapter's longer match is not ours
    saved, common = cache.best([1, 2, 3, 4, 5, 7], "policy", limit=4)
    assert saved is not None and saved.adapter == "policy" and common == 4  # at most the limit
    assert cache.best([7, 8], None, limit=10) == (None, 0)
    assert cache.best([1, 2, 3], "other", limit=10) == (None, 0)


def test_the_budget_evicts_the_least_recently_used_state():
    cache = PromptCache(budget_bytes=250)
    cache.add([1, 1], None, b"x" * 100)
    cache.add([2, 2], None, b"y" * 100)
    cache.best([1, 1, 5], None, limit=5)  # [1, 1] is used again: [2, 2] is now the oldest
    cache.add([3, 3], None, b"z" * 100)
    assert cache.size_bytes == 200 and len(cache) == 2 and cache.evictions == 1
    assert cache.best([2, 2], None, limit=5) == (None, 0)
    assert cache.best([1, 1], None, limit=5)[1] == 2 and cache.best([3, 3], None, limit=5)[1] == 2
    assert not cache.add([4], None, b"w" * 251)  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2


def test_a_state_that_extends_a_saved_one_replaces_it_and_a_covered_one_is_not_saved_twice():
    cache = PromptCache(budget_bytes=1000)
    cache.add([1, 2], None, b"a" * 10)
    cache.add([1, 2, 3, 4], None, b"b" * 20)
    assert len(cache) == 1 and cache.size_bytes == 20
    assert cache.covers([1, 2, 3], None) and not cache.covers([1, 2, 3], "policy") and not cache.covers([1, 3], None)


# ---- on the built-in model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=1)  # two sequences in all
    yield engine
    engine.close()


def _second_turn(engine, first_answer: str) -> list[dict[str, str]]:
    return [
        *TURN1,
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And three vegetables? Answer in one short sentence."},
    ]


def _use_every_sequence(engine) -> None:
    """Two unrelated requests at once: each of the engine's two sequences is taken and its cells replaced."""
    others = [[{"role": "user", "content": f"Tell me about the number {i}. " * 8}] for i in range(2)]
    threads = [
        threading.Thread(target=lambda m=m: collect(engine.chat(m, SamplingParams(temperature=0, max_tokens=8))))
        for m in others
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _tokens(completion) -> list[tuple[str, float]]:
    return [(record.token, record.logprob) for record in completion.logprobs]


def test_a_second_turn_after_the_slots_were_recycled_prefills_only_what_is_new(engine):
    engine.drop_cached_prompts()
    first = collect(engine.chat(TURN1, GREEDY))
    turn2 = _second_turn(engine, first.text)
    prompt1 = len(engine.tokenize(engine.render_chat(TURN1)))
    prompt2 = len(engine.tokenize(engine.render_chat(turn2)))
    from_idle = collect(engine.chat(turn2, GREEDY))  # the conversation's own sequence still holds turn 1

    engine.drop_cached_prompts()
    collect(engine.chat(TURN1, GREEDY))
    _use_every_sequence(engine)
    ids2 = engine.tokenize(engine.render_chat(turn2))
    held = [common_prefix_len(tokens, ids2) for tokens in engine._idle.values()]
    assert all(n < prompt1 // 2 for n in held), held  # no sequence holds the conversation any more
    prefilled, restored = engine.prefilled_tokens, engine.restored_tokens
    recycled = collect(engine.chat(turn2, GREEDY))
    assert engine.restored_tokens - restored >= prompt1  # turn 1's prompt (and answer) came back from RAM
    assert engine.prefilled_tokens - prefilled <= prompt2 - prompt1  # at most the answer and the new message
    assert _tokens(recycled) == _tokens(from_idle)  # the same cells as the idle sequence held: the same numbers

    engine.drop_cached_prompts()
    prefilled = engine.prefilled_tokens
    cold = collect(engine.chat(turn2, GREEDY))
    assert engine.prefilled_tokens - prefilled == prompt2
    for (cold_token, cold_logprob), (token, logprob) in zip(_tokens(cold), _tokens(recycled), strict=False):
        assert abs(cold_logprob - logprob) <= CACHED_LOGPROB_TOLERANCE
        if cold_token != token:  # a near-tie flipped: the rest continues different texts
            break


def test_without_a_ram_budget_a_recycled_conversation_is_prefilled_again():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=1, cache_ram_mib=0)
    try:
        first = collect(engine.chat(TURN1, GREEDY))
        _use_every_sequence(engine)
        ids2 = engine.tokenize(engine.render_chat(_second_turn(engine, first.text)))
        held = max(common_prefix_len(tokens, ids2) for tokens in engine._idle.values())  # a shared template start
        prefilled = engine.prefilled_tokens
        collect(engine.chat(_second_turn(engine, first.text), GREEDY))
        assert engine.prefilled_tokens - prefilled == len(ids2) - held
        assert engine.restored_tokens == 0 and engine.counters()["prompt_cache_restored_tokens"] == 0
    finally:
        engine.close()


def test_the_ram_budget_is_respected_by_evicting_the_least_recently_used_prompt():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=1, cache_ram_mib=4)
    budget = 4 << 20
    try:
        prompts = [f"{first} a quiet morning by the river, " * 12 for first in ("Once", "Later")]
        short = SamplingParams(temperature=0, max_tokens=4)
        for prompt in prompts:  # each prompt's state is ~3 MiB here, so the budget holds one
            collect(engine.generate(prompt, short))
            engine.drop_cached_prompts(keep_in_ram=True)
            cache = engine._prompt_cache
            assert 0 < cache.size_bytes <= budget and len(cache) == 1
        assert cache.evictions == 1
        restored = engine.restored_tokens
        collect(engine.generate(prompts[0], short))  # evicted: prefilled again
        assert engine.restored_tokens == restored
        collect(engine.generate(prompts[1], short))  # kept: restored
        assert engine.restored_tokens > restored
    finally:
        engine.close()


def test_metrics_show_the_prompt_tokens_prefilled_beside_those_received(engine, serve):
    engine.drop_cached_prompts()
    with serve({"smollm2": engine}) as url:
        client = OpenAI(base_url=url, api_key="none")
        base = url.removesuffix("/v1")

        def scrape() -> dict[str, float]:
            lines = httpx.get(f"{base}/metrics").text.splitlines()
            return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}

        first = client.chat.completions.create(model="smollm2", messages=TURN1, temperature=0, max_tokens=24)
        _use_every_sequence(engine)
        before = scrape()
        turn2 = _second_turn(engine, first.choices[0].message.content)
        reply = client.chat.completions.create(model="smollm2", messages=turn2, temperature=0, max_tokens=24)
        after = scrape()
    received = after["tandem_prompt_tokens_total"] - before["tandem_prompt_tokens_total"]
    prefilled = after["tandem_prompt_tokens_prefilled_total"] - before["tandem_prompt_tokens_prefilled_total"]
    restored = after["tandem_prompt_cache_restored_tokens_total"] - before["tandem_prompt_cache_restored_tokens_total"]
    assert received == reply.usage.prompt_tokens
    assert prefilled + restored == received and restored > prefilled
