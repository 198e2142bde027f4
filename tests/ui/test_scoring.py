"""What Compare scores: reasoning treated the same on both sides and both models, and a label that says what Σ measures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from tandemlm.deploy.mock_engine import MockEngine
from tandemlm.deploy.types import SamplingParams
from tandemlm.ui.compare.divergence_scoring import measure_note, score_answer
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.compare.turn import compare_views
from tandemlm.ui.engines import EnginePool, EngineSlot

SAMPLING = (64, 1.0, 1.0, 0, -1)  # max tokens, temperature, top-p, top-k, seed


class R1Mock(MockEngine):
    """A mock whose chat template opens the reasoning block, as DeepSeek-R1's does (prompt ends ``<think>\\n``)."""

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools=None) -> str:
        return super().render_chat(messages, add_generation_prompt, tools) + ("<think>\n" if add_generation_prompt else "")


def _slots() -> dict[str, EngineSlot]:
    """Policy: an R1-style model (reasons inside the opened block). Reference: one that opens the block itself."""
    engines = {"r1": R1Mock(reply="2+2 is 4\n</think>\n\nFour."), "plain": MockEngine(reply="<think>\nhm\n</think>\n\nOK")}
    pool = EnginePool(lambda model, backend, **_: engines[model])
    return {"policy": EngineSlot("policy", pool, "r1"), "reference": EngineSlot("reference", pool, "plain")}


def test_reasoning_is_scored_with_the_answer_on_both_sides_under_both_models():
    *_, view = compare_views(_slots(), Judges(), "2+2?", None, *SAMPLING)
    comparison = view.comparison
    assert (comparison.left.response, comparison.right.response) == ("Four.", "OK")
    left, right = comparison.scores["left"], comparison.scores["right"]
    # The same text under both models: one span per character (one token each), none merged away.
    assert "".join(d.text for d in left.diffs) == "2+2 is 4\n</think>\n\nFour." and len(left.diffs) == 24
    assert "".join(d.text for d in right.diffs) == "hm\n</think>\n\nOK" and len(right.diffs) == 15
    # Each model scores the text as written in its own format: its own answer is all likely (log 0.9).
    assert all(d.policy_logprob == pytest.approx(math.log(0.9)) for d in left.diffs)
    assert all(d.reference_logprob == pytest.approx(math.log(0.9)) for d in right.diffs)
    assert "over the policy's reasoning and answer" in left.note and "over the reference's reasoning and answer" in right.note
    assert "the policy&#x27;s reasoning and answer" in view.divergence["left"]


def test_with_reasoning_left_out_only_the_answer_counts_on_both_models():
    slots = _slots()
    messages = [{"role": "user", "content": "2+2?"}]
    for role in ("policy", "reference"):
        tokens = score_answer(slots[role].get(), messages, "2+2 is 4\n", "Four.", include_reasoning=False)
        assert "".join(text for text, _ in tokens) == "Four."
    note = measure_note("policy", SamplingParams(temperature=1.0), "2+2 is 4\n", include_reasoning=False)
    assert "over the policy's answer (after its reasoning, not scored)" in note


def test_an_answer_without_reasoning_is_scored_after_a_closed_block_by_an_r1_model():
    engine = R1Mock(reply="x")
    tokens = score_answer(engine, [{"role": "user", "content": "q"}], "", "Paris.")
    assert "".join(text for text, _ in tokens) == "Paris."
    assert score_answer(MockEngine(), [{"role": "user", "content": "q"}], "", "Paris.") == [
        (c, pytest.approx(math.log(0.01))) for c in "Paris."
    ]


def test_the_label_says_scored_at_t1_and_whether_the_estimate_is_unbiased():
    unbiased = measure_note("policy", SamplingParams(temperature=1.0, top_p=1.0))
    assert unbiased.startswith("Scored at T=1, top-p 1 (both models' own probabilities) over the policy's answer")
    assert "a one-sample estimate of KL(policy ‖ reference)" in unbiased and "unbiased: this answer was sampled at T=1" in unbiased
    biased = measure_note("policy", SamplingParams(temperature=0.7, top_p=0.9, top_k=40))
    assert "biased: this answer was sampled at T=0.7, top-p 0.9, top-k 40, not T=1, top-p 1, top-k off" in biased
    reference = measure_note("reference", SamplingParams(temperature=1.0))
    assert "minus a one-sample estimate of KL(reference ‖ policy)" in reference


@pytest.mark.slow
def test_the_r1_template_of_the_tiny_qwen2_scores_reasoning_and_answer_as_its_tokenizer_cuts_them(tiny_qwen2_dir):
    """The real R1-Distill-Qwen template and tokenizer: the prompt ends ``<think>\\n``, which is not scored again."""
    from tandemlm.deploy.registry import load_engine

    engine = load_engine(str(tiny_qwen2_dir), backend="transformers")
    try:
        messages = [{"role": "user", "content": "What is 2+2?"}]
        assert engine.render_chat(messages).endswith("<think>\n")
        tokens = score_answer(engine, messages, "2+2 is 4.\n", "Four.")
        assert "".join(text for text, _ in tokens) == "2+2 is 4.\n</think>\n\nFour."
        ids = engine.tokenize("2+2 is 4.\n</think>\n\nFour.")
        assert len(tokens) == len(ids) and "</think>" in [text for text, _ in tokens]
        # A block the model never closed (out of tokens): the reasoning alone, no </think> it did not write.
        unclosed = score_answer(engine, messages, "2+2 is", "")
        assert "".join(text for text, _ in unclosed) == "2+2 is"
    finally:
        engine.close()
