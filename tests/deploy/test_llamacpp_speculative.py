"""``--speculative ngram`` on the llama.cpp backend: the drafter on hand-made tokens, then the built-in
model decoding the same tokens with and without it (greedy, seeded sampling, a JSON schema, log-probs).

Token-for-token identity needs the logits of a position to be the same bits whether it is decoded alone
(plain decoding) or among drafts (checking them). On llama.cpp's CPU backend that holds while the KV
cache spans fewer than 512 cells: from 512 on, flash attention decodes a lone token on a path of its own
that splits the cells between threads (``use_split_kv_path`` in ggml-cpu/ops.cpp), which rounds
differently. So the identity tests run on a 256-cell context, and a longer answer is checked for the
only difference rounding can make: a flip between two near-tied candidates.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from openai import OpenAI

from tandemlm.deploy.ngram_draft import NgramDrafter, ngram_draft
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import OutputConstraint, SamplingParams
from tandemlm.errors import EngineError

# ---- the drafter ----------------------------------------------------------------------------------


def test_a_repeated_ngram_drafts_what_followed_it():
    #          0  1  2  3  4  5  6  7  8
    tokens = [5, 6, 7, 8, 9, 1, 2, 6, 7]  # ends with 6 7, seen at 1..2, followed by 8 9 1 2
    assert ngram_draft(tokens, 3) == [8, 9, 1]
    assert ngram_draft(tokens, 10) == [8, 9, 1, 2, 6, 7, 8, 9, 1, 2]  # past the end, the period carries on


def test_no_earlier_occurrence_drafts_nothing():
    assert ngram_draft([1, 2, 3, 4, 5], 4) == []
    assert ngram_draft([1, 2, 3, 1], 4) == []  # one token is below min_n
    assert ngram_draft([1, 2], 4) == [] and ngram_draft([], 4) == []
    assert ngram_draft([1, 2, 3, 1, 2], 0) == []


def test_the_most_recent_occurrence_and_the_longest_ngram_win():
    # "1 2" is followed by 3 first and by 4 later: the later one is the guess.
    assert ngram_draft([1, 2, 3, 0, 1, 2, 4, 0, 1, 2], 1) == [4]
    # "7 1 2" (3 tokens) matched only at the start beats the more recent "1 2" (2 tokens).
    assert ngram_draft([7, 1, 2, 3, 0, 1, 2, 4, 7, 1, 2], 1) == [3]
    assert ngram_draft([7, 1, 2, 3, 0, 1, 2, 4, 7, 1, 2], 1, max_n=2) == [4]


def test_the_index_grows_with_the_sequence_and_matches_a_fresh_one():
    drafter = NgramDrafter()
    drafter.limit = 5
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    tokens += tokens[4:14]
    for i, token in enumerate(tokens):
        drafter.extend([token])
        assert drafter.draft(5) == ngram_draft(tokens[: i + 1], 5), i
    drafter.extend([])
    assert drafter.draft(3) == tokens[14:17] == [9, 3, 2]  # "8 9 7" last seen at 11..13
    with pytest.raises(ValueError):
        NgramDrafter(max_n=1, min_n=2)


def test_the_draft_length_grows_while_drafts_are_kept_and_shrinks_after_a_miss():
    drafter = NgramDrafter()
    drafter.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 1, 2])
    assert drafter.draft(100) == [3, 4, 5, 6]  # 4 at first
    drafter.record(4, 4, most=9)
    assert len(drafter.draft(100)) == 6
    drafter.record(6, 6, most=9)
    drafter.record(8, 8, most=9)
    assert drafter.limit == 9  # never past the most
    assert len(drafter.draft(3)) == 3  # nor past what the caller allows
    for _ in range(10):
        drafter.record(9, 1)
    assert drafter.limit == 2


# ---- on the built-in model ------------------------------------------------------------------------

RECORD = {"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"], "notes": "first algorithm"}
REPEAT_JSON = [{"role": "user", "content": f"Repeat this JSON exactly, nothing else: {json.dumps(RECORD)}"}]
CODE = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"
RENAME = [{"role": "user", "content": f"Rename width to w and height to h in this code:\n```python\n{CODE}```"}]
PROMPTS = [
    REPEAT_JSON,
    RENAME,
    [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
    [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
]
GREEDY = SamplingParams(temperature=0, max_tokens=48)


@pytest.fixture(scope="module")
def plain():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=256, n_parallel=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def spec():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=256, n_parallel=2, speculative="ngram")
    yield engine
    engine.close()


def _tokens(engine, messages, params):
    return list(engine.stream_tokens(engine.tokenize(engine.render_chat(messages)), params))


def _ids(tokens) -> list[int]:
    return [t.token_id for t in tokens]


def test_an_unknown_speculative_mode_is_refused():
    with pytest.raises(EngineError, match="--speculative 'eagle' is not a mode: it takes 'ngram'"):
        load_engine("smollm2", backend="llama.cpp", n_ctx=256, speculative="eagle")


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_output_is_token_for_token_that_of_plain_decoding(plain, spec, index):
    drafted, accepted = spec.spec_draft_tokens, spec.spec_accepted_tokens
    expected = _ids(_tokens(plain, PROMPTS[index], GREEDY))
    assert _ids(_tokens(spec, PROMPTS[index], GREEDY)) == expected
    assert spec.spec_accepted_tokens <= spec.spec_draft_tokens
    if PROMPTS[index] is REPEAT_JSON:  # copying: drafts were made and most were kept
        assert spec.spec_accepted_tokens - accepted >= len(expected) // 2, (spec.counters(), len(expected))
        assert spec.spec_draft_tokens > drafted
    assert plain.spec_draft_tokens == 0  # off unless asked for


def test_a_seeded_sampled_request_draws_the_same_tokens(plain, spec):
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=48)
    accepted = spec.spec_accepted_tokens
    expected = _ids(_tokens(plain, REPEAT_JSON, params))
    assert _ids(_tokens(spec, REPEAT_JSON, params)) == expected
    assert spec.spec_accepted_tokens > accepted


def test_a_json_schema_request_and_its_logprobs_match_plain_decoding(plain, spec):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
        "required": ["name", "born"],
        "additionalProperties": False,
    }
    params = SamplingParams(temperature=0, max_tokens=48, constraint=OutputConstraint(schema), logprobs=3)
    accepted = spec.spec_accepted_tokens
    expected = _tokens(plain, REPEAT_JSON, params)
    got = _tokens(spec, REPEAT_JSON, params)
    assert _ids(got) == _ids(expected)
    assert json.loads(spec.detokenize(_ids(got)))["born"] == 1815
    assert spec.spec_accepted_tokens > accepted
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=LOGPROB_TOLERANCE)
        assert [t for t, _ in mine.top_logprobs] == [t for t, _ in theirs.top_logprobs]
        for (_, a), (_, b) in zip(mine.top_logprobs, theirs.top_logprobs, strict=True):
            assert a == pytest.approx(b, abs=LOGPROB_TOLERANCE)


# Within 256 cells the log-probs came out bit-identical (all four prompts, greedy and JSON-constrained,
# logprobs=3); this leaves room for other kernels' rounding without hiding a wrong token (ids compare exactly).
LOGPROB_TOLERANCE = 1e-4


def test_concurrent_speculative_requests_stay_independent(plain, spec):
    prompts = [REPEAT_JSON, RENAME]
    expected = [_ids(_tokens(plain, messages, GREEDY)) for messages in prompts]
    results: dict[int, list[int]] = {}
    spec.max_sequences_per_step = 0

    def run(i: int) -> None:
        results[i] = _ids(_tokens(spec, prompts[i], GREEDY))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert spec.max_sequences_per_step == 2  # they shared decode steps
    assert [results[i] for i in range(len(prompts))] == expected


def test_metrics_count_drafted_and_accepted_tokens(spec, serve):
    with serve({"smollm2": spec}) as url:
        client = OpenAI(base_url=url, api_key="none")
        client.chat.completions.create(model="smollm2", messages=REPEAT_JSON, temperature=0, max_tokens=48)
        lines = httpx.get(f"{url.removesuffix('/v1')}/metrics").text.splitlines()
    values = {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")}
    assert values["tandem_spec_draft_tokens_total"] == spec.spec_draft_tokens > 0
    assert values["tandem_spec_accepted_tokens_total"] == spec.spec_accepted_tokens > 0
    assert any(line.startswith("# HELP tandem_spec_accepted_tokens_total") for line in lines)


# Past 512 cells, flash attention rounds a lone token differently (module docstring): on this prompt
# (238 tokens, 128 answered) log-probs moved by up to 0.43 nats, and plain decoding's token 63 won by
# 0.03 nats, which checking drafts gave to the runner-up. A wrong cache would move far more.
NEAR_TIE = 0.15
PEOPLE = json.dumps(
    [
        {"id": 1, "name": "Ada Lovelace", "born": 1815, "field": "mathematics", "city": "London"},
        {"id": 2, "name": "Alan Turing", "born": 1912, "field": "computer science", "city": "Manchester"},
        {"id": 3, "name": "Grace Hopper", "born": 1906, "field": "programming languages", "city": "New York"},
        {"id": 4, "name": "Edsger Dijkstra", "born": 1930, "field": "algorithms", "city": "Rotterdam"},
    ],
    indent=2,
)  # bench/speculative.py's third prompt


def test_past_512_cells_a_difference_is_only_a_flip_between_near_tied_tokens():
    messages = [{"role": "user", "content": f"Return this JSON with every city in upper case, nothing else:\n{PEOPLE}"}]
    params = SamplingParams(temperature=0, max_tokens=128, logprobs=2)
    answers = {}
    for mode in (None, "ngram"):
        engine = load_engine("smollm2", backend="llama.cpp", n_ctx=1024, n_parallel=1, speculative=mode)
        try:
            answers[mode] = _tokens(engine, messages, params)
            assert mode is None or engine.spec_accepted_tokens > 0
        finally:
            engine.close()
    plain_tokens, spec_tokens = answers[None], answers["ngram"]
    first = next(
        (i for i, (a, b) in enumerate(zip(plain_tokens, spec_tokens, strict=False)) if a.token_id != b.token_id), None
    )
    if first is None:
        assert _ids(plain_tokens) == _ids(spec_tokens)
        return
    for record in (plain_tokens[first], spec_tokens[first]):  # each picked one of two near-tied candidates
        (best, best_lp), (second, second_lp) = record.top_logprobs
        assert best_lp - second_lp < NEAR_TIE, record.top_logprobs
        assert {best, second} == {plain_tokens[first].token_id, spec_tokens[first].token_id}
