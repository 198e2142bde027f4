"""``--speculative ngram`` on the llama.cpp backend: the drafter on hand-made tokens, then the built-in
model decoding the same tokens with and without it (greedy, seeded sampling, a JSON schema, log-probs)."""

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
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    tokens += tokens[4:14]
    for i, token in enumerate(tokens):
        drafter.extend([token])
        assert drafter.draft(5) == ngram_draft(tokens[: i + 1], 5), i
    drafter.extend([])
    assert drafter.draft(3) == tokens[14:17] == [9, 3, 2]  # "8 9 7" last seen at 11..13
    with pytest.raises(ValueError):
        NgramDrafter(max_n=1, min_n=2)


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
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def spec():
    engine = load_engine("smollm2", backend="llama.cpp", n_ctx=2048, n_parallel=2, speculative="ngram")
    yield engine
    engine.close()


def _tokens(engine, messages, params):
    return list(engine.stream_tokens(engine.tokenize(engine.render_chat(messages)), params))


def _ids(tokens) -> list[int]:
    return [t.token_id for t in tokens]


def test_an_unknown_speculative_mode_is_refused():
    with pytest.raises(EngineError, match="--speculative takes 'ngram'"):
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


# Checking drafts decodes several positions of a sequence in one batch where plain decoding decodes one.
# On llama.cpp's CPU backend each row is computed alone, so the log-probs came out bit-identical (all four
# prompts, greedy and JSON-constrained, logprobs=3); other backends' kernels may round differently per
# batch shape, which this leaves room for without hiding a wrong token (the ids are compared exactly).
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
