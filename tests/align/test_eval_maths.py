"""The eval report's arithmetic on hand-worked numbers, and response log-probs against a forward done by hand."""

from __future__ import annotations

import pytest

from tandemlm.align.evaluate import _kl, _win_rate, pair_margin_report


def test_kl_is_policy_minus_reference_summed_per_response_and_averaged():
    policy = [[-1.0, -2.0], [-0.5]]
    reference = [[-1.5, -3.0], [-0.25]]
    # response 1: (-1 - 2) - (-1.5 - 3) = 1.5; response 2: -0.5 - -0.25 = -0.25
    kl = _kl(policy, reference, temperature=1.0)
    assert kl["per_response"] == pytest.approx((1.5 - 0.25) / 2)  # 0.625: mean over 2 responses
    assert kl["per_token"] == pytest.approx((1.5 - 0.25) / 3)  # 0.4167: over the policy's 3 tokens
    assert kl["note"] is None
    backwards = _kl(reference, policy, temperature=1.0)
    assert backwards["per_response"] == pytest.approx(-0.625)  # the direction matters
    assert "biased" in _kl(policy, reference, temperature=0.7)["note"]


def test_kl_of_no_responses_is_zero():
    assert _kl([], [], 1.0)["per_response"] == 0.0 and _kl([], [], 1.0)["per_token"] == 0.0


def test_win_rate_counts_ties_as_half_and_skips_unscored():
    policy = [3.0, 1.0, 2.0, 7.0, None]
    reference = [1.0, 1.0, 4.0, 0.0, 2.0]
    # wins: 3>1, 7>0; tie: 1=1; loss: 2<4; the unscored pair is left out -> (2 + 1/2) / 4
    assert _win_rate(policy, reference) == {"wins": 2, "ties": 1, "losses": 1, "win_rate": 0.625}
    assert _win_rate(reference, policy)["win_rate"] == 0.375
    assert _win_rate([None], [1.0])["win_rate"] is None


def test_pair_margin_is_beta_times_chosen_minus_rejected_log_ratio():
    policy = {"chosen": [-10.0, -5.0], "rejected": [-20.0, -6.0]}
    reference = {"chosen": [-12.0, -4.0], "rejected": [-19.0, -9.0]}
    # pair 1: ((-10 + 12) - (-20 + 19)) = 2 - (-1) = 3; pair 2: ((-5 + 4) - (-6 + 9)) = -1 - 3 = -4
    report = pair_margin_report(policy, reference, beta=0.1)
    assert report["n"] == 2 and report["beta"] == 0.1
    assert report["mean_margin"] == pytest.approx((0.3 - 0.4) / 2)
    assert report["accuracy"] == 0.5
    swapped = pair_margin_report(reference, policy, beta=0.1)
    assert swapped["mean_margin"] == pytest.approx(0.05)


def test_response_logprobs_match_a_forward_pass_done_by_hand():
    """Each response token's log-prob is read from the logits one position before it, per row, padding ignored."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandemlm.align.model import load_tokenizer
    from tandemlm.align.sampling import render_prompts, response_logprobs
    from tandemlm.testing.tiny_models import tiny_model

    folder = tiny_model("llama")
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer question, padded less."}]]
    responses = [[100, 200, 300, 400], [7, 8]]  # lengths differ, so the batch pads one row

    got = response_logprobs(model, tokenizer, prompts, responses, batch_size=2)

    for text, response, row in zip(render_prompts(tokenizer, prompts), responses, got, strict=True):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = torch.tensor([prompt_ids + response])
        with torch.inference_mode():
            logits = model(input_ids=full).logits[0].float()
        expected = []
        for j, token in enumerate(response):
            position = len(prompt_ids) + j  # where the token sits; the logits before it predict it
            expected.append(torch.log_softmax(logits[position - 1], dim=-1)[token].item())
        assert row == pytest.approx(expected, abs=1e-4)

