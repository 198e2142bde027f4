"""Per-token log-ratios and sequence KL, checked on cases worked out by hand."""

from __future__ import annotations

import pytest

from tandemlm.ui.compare.divergence import TokenDiff, align_tokens, divergence_html, ratio_color, sequence_kl


def test_same_tokenizer_pairs_tokens_and_sums_log_ratios():
    diffs = align_tokens([("a", -1.0), ("b", -2.0)], [("a", -1.5), ("b", -1.0)])
    assert [d.text for d in diffs] == ["a", "b"]
    assert [d.log_ratio for d in diffs] == pytest.approx([0.5, -1.0])
    assert sequence_kl(diffs) == pytest.approx(-0.5)


def test_different_tokenizers_merge_to_shared_boundaries():
    # policy cuts "ab|c", reference "a|bc": the only shared boundary is the end -> one span
    diffs = align_tokens([("ab", -1.0), ("c", -2.0)], [("a", -0.5), ("bc", -1.0)])
    assert diffs == [TokenDiff("abc", -3.0, -1.5)]
    # policy "a|b|cd", reference "ab|c|d": shared boundaries after "ab" and at the end
    diffs = align_tokens([("a", -1.0), ("b", -1.0), ("cd", -1.0)], [("ab", -1.5), ("c", -0.2), ("d", -0.3)])
    assert [(d.text, d.policy_logprob, d.reference_logprob) for d in diffs] == [
        ("ab", -2.0, -1.5),
        ("cd", -1.0, pytest.approx(-0.5)),
    ]


def test_texts_that_disagree_are_one_span_from_the_first_difference():
    # a multi-byte character decoded per token as two replacement characters on one side
    diffs = align_tokens([("a", -1.0), ("\ufffd", -1.0), ("\ufffd", -1.0)], [("a", -1.0), ("é", -2.0)])
    assert [(d.text, d.policy_logprob, d.reference_logprob) for d in diffs] == [
        ("a", -1.0, -1.0),
        ("\ufffd\ufffd", -2.0, -2.0),
    ]
    assert align_tokens([], []) == []


def test_colour_is_blue_for_policy_red_for_reference_with_capped_opacity():
    assert ratio_color(1.0, scale=2.0) == "rgba(37, 99, 235, 0.50)"
    assert ratio_color(-3.0, scale=2.0) == "rgba(220, 38, 38, 1.00)"
    assert ratio_color(0.0) == "rgba(37, 99, 235, 0.00)"


def test_html_escapes_tokens_and_states_the_kl():
    html = divergence_html([TokenDiff("<b>", -1.0, -2.0), TokenDiff(" x", -1.0, -1.0)], "policy answer")
    assert "&lt;b&gt;" in html and "<b><" not in html
    assert "+1.000</b> nats over 2 tokens" in html
    assert "rgba(37, 99, 235, 0.50)" in html
    assert "no tokens" in divergence_html([], "empty")


def test_compare_divergence_is_policy_minus_reference_with_a_per_token_mean():
    """Through the Compare tab's scoring: the policy slot's log-probs minus the reference slot's, on numbers by hand."""
    from types import SimpleNamespace

    from tandemlm.deploy.types import SamplingParams
    from tandemlm.ui.compare.turn import SideRun, _score

    def slot(logprobs):
        engine = SimpleNamespace(token_logprobs=lambda messages, text: logprobs, render_chat=lambda messages: "<|assistant|>")
        return SimpleNamespace(get=lambda: engine)

    def _divergence(slots, messages, side):
        return _score(slots, messages, side, SamplingParams()).html()

    policy = [("Par", -0.1), ("is", -1.2), ("!", -0.7)]
    reference = [("Par", -2.3), ("is", -0.2), ("!", -0.7)]
    html = _divergence({"policy": slot(policy), "reference": slot(reference)}, [], SideRun("policy", "m", text="Paris!"))
    # (-0.1 + 2.3) + (-1.2 + 0.2) + 0 = 2.2 - 1.0 = +1.2 nats; mean over the 3 tokens +0.4
    assert "<b>+1.200</b> nats over 3 tokens (mean +0.400)" in html
    assert "log π/π_ref = +2.200" in html and "log π/π_ref = -1.000" in html
    assert ratio_color(2.2) in html and ratio_color(-1.0) in html  # blue where the policy is more sure, red otherwise
    swapped = _divergence({"policy": slot(reference), "reference": slot(policy)}, [], SideRun("policy", "m", text="Paris!"))
    assert "<b>-1.200</b> nats over 3 tokens (mean -0.400)" in swapped


def test_top_divergent_tokens_are_listed_with_numbers_and_strong_colour_gets_white_text():
    from tandemlm.ui.compare.divergence import text_color, top_divergent

    diffs = [TokenDiff("Par", -0.1, -2.3), TokenDiff("is", -1.2, -0.2), TokenDiff("!", -0.7, -0.7)]
    assert [d.text for d in top_divergent(diffs)] == ["Par", "is"]  # |+2.2| then |-1.0|; "!" does not differ
    html = divergence_html(diffs, "policy answer")
    assert "Most divergent tokens (log π/π_ref, nats): <code>&#x27;Par&#x27;</code> +2.20 (policy -0.10, reference -2.30)" in html
    assert "color:#fff" in html and text_color(0.4) == "inherit"  # white only where the colour is strong
    assert "both models score this answer the same" in divergence_html([TokenDiff("a", -1.0, -1.0)], "same")


def test_the_colour_scale_redraws_the_finished_comparison_without_running_the_models(make_slots):
    from tandemlm.ui.compare.events import redraw_event
    from tandemlm.ui.compare.judges import Judges
    from tandemlm.ui.compare.turn import compare_views

    slots = make_slots("hello", "world")
    *_, view = compare_views(slots, Judges(), "hi", None, 64, 0.7, 1.0, 0, -1)
    engines = [slots[role].get() for role in ("policy", "reference")]
    for engine in engines:  # from here on any model call fails the test
        engine.token_logprobs = engine.chat = lambda *args, **kwargs: pytest.fail("the models ran again")
    import math

    kl = 4 * (math.log(0.9) - math.log(0.01))  # 4 of 5 characters differ, +4.5 nats each (see test_compare)
    assert ratio_color(4.5, 2.0) in view.divergence["left"]  # the default: full colour from 2 nats
    redrawn = redraw_event(view.comparison, 9.0)
    left, right = redrawn.left_divergence, redrawn.right_divergence
    assert ratio_color(4.5, 9.0) == "rgba(37, 99, 235, 0.50)" and ratio_color(4.5, 9.0) in left
    assert ratio_color(4.5, 2.0) not in left and ratio_color(-4.5, 9.0) in right
    assert f"<b>+{kl:.3f}</b>" in left and "full colour at |log-ratio| ≥ 9 nats" in redrawn.legend


def test_redrawing_a_blind_battle_keeps_it_hidden_until_the_vote(make_slots, tmp_path):
    import random

    import gradio as gr

    from tandemlm.ui.compare.divergence_scoring import HIDDEN
    from tandemlm.ui.compare.events import redraw_event
    from tandemlm.ui.compare.judges import Judges
    from tandemlm.ui.compare.turn import compare_views
    from tandemlm.ui.compare.vote_panel import record_vote

    *_, view = compare_views(make_slots(), Judges(), "hi", None, 64, 0.7, 1.0, 0, -1, blind=True, rng=random.Random(0))
    hidden = redraw_event(view.comparison, 4.0)
    assert (hidden.left_divergence, hidden.right_divergence) == (HIDDEN, HIDDEN)
    _, voted = record_vote(str(tmp_path / "v.jsonl"), view.comparison, "tie")
    assert "Σ log π/π_ref" in redraw_event(voted, 4.0).left_divergence
    nothing = redraw_event(None, 4.0)  # nothing finished yet: the panes keep what they show
    assert (nothing.left_divergence, nothing.right_divergence) == (gr.skip(), gr.skip()) and "4 nats" in nothing.legend
