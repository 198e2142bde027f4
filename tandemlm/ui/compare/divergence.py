"""Where policy and reference diverge: per-token log-ratios, sequence KL, and their HTML view.

For a response y to prompt x, each token's contribution is ``log π_policy(y_t | x, y_<t) −
log π_ref(y_t | x, y_<t)``. Summed over a response sampled from the policy this is the usual
single-sample estimate of ``KL(π_policy ‖ π_ref)`` (what PPO/GRPO penalise and DPO implicitly
bounds). Pure functions, no Gradio.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

TokenLogprobs = Sequence[tuple[str, float]]
"""What :meth:`Engine.token_logprobs` returns: ``(token text, log-probability)`` pairs."""

POSITIVE_RGB = (37, 99, 235)  # blue: the policy likes this token more than the reference
NEGATIVE_RGB = (220, 38, 38)  # red: the reference likes it more


@dataclass(frozen=True)
class TokenDiff:
    """One span of the response with its log-probability under each model."""

    text: str
    policy_logprob: float
    reference_logprob: float

    @property
    def log_ratio(self) -> float:
        """``log π_policy − log π_ref`` for this span (its per-token KL contribution)."""
        return self.policy_logprob - self.reference_logprob


def align_tokens(policy: TokenLogprobs, reference: TokenLogprobs) -> list[TokenDiff]:
    """Pairs the two models' per-token log-probs of the same response text.

    With one tokenizer the tokens pair one to one. With two, spans are merged up to the nearest
    boundary both tokenizations share, and each side's log-probs are summed over the span: the
    log-probability of a piece of text does not depend on how it is cut into tokens. Past the
    point where the decoded texts disagree (e.g. a multi-byte character split differently) the
    rest is one span.
    """
    p_texts, r_texts = [t for t, _ in policy], [t for t, _ in reference]
    if p_texts == r_texts:
        return [TokenDiff(t, lp, lr) for (t, lp), (_, lr) in zip(policy, reference, strict=True)]
    if not policy:
        return []
    p_ends, r_ends = list(accumulate(map(len, p_texts))), list(accumulate(map(len, r_texts)))
    text = "".join(p_texts)
    other = "".join(r_texts)
    agree = next((i for i, (a, b) in enumerate(zip(text, other, strict=False)) if a != b), min(len(text), len(other)))
    cuts = sorted(c for c in set(p_ends) & set(r_ends) if 0 < c <= agree)
    if not cuts or cuts[-1] != len(text):
        cuts.append(len(text))
    diffs: list[TokenDiff] = []
    i = j = start = 0
    for k, cut in enumerate(cuts):
        last = k == len(cuts) - 1
        lp = lr = 0.0
        while i < len(policy) and (last or p_ends[i] <= cut):
            lp += policy[i][1]
            i += 1
        while j < len(reference) and (last or r_ends[j] <= cut):
            lr += reference[j][1]
            j += 1
        diffs.append(TokenDiff(text[start:cut], lp, lr))
        start = cut
    return diffs


def sequence_kl(diffs: Sequence[TokenDiff]) -> float:
    """Sum of log-ratios over the response: the sequence-level KL estimate when sampled from the policy."""
    return sum(d.log_ratio for d in diffs)


def ratio_color(log_ratio: float, scale: float = 2.0) -> str:
    """CSS colour for one log-ratio: blue above 0, red below, opacity ``|log_ratio| / scale`` capped at 1."""
    alpha = min(abs(log_ratio) / scale, 1.0)
    red, green, blue = POSITIVE_RGB if log_ratio >= 0 else NEGATIVE_RGB
    return f"rgba({red}, {green}, {blue}, {alpha:.2f})"


def text_color(log_ratio: float, scale: float = 2.0) -> str:
    """Token text colour readable on :func:`ratio_color`: white on strong colour, the theme's own on faint."""
    return "#fff" if abs(log_ratio) / scale >= 0.5 else "inherit"


def top_divergent(diffs: Sequence[TokenDiff], count: int = 5) -> list[TokenDiff]:
    """The ``count`` spans with the largest ``|log π/π_ref|``, largest first (ties keep text order)."""
    return sorted((d for d in diffs if d.log_ratio != 0.0), key=lambda d: -abs(d.log_ratio))[:count]


def _top_html(diffs: Sequence[TokenDiff]) -> str:
    top = top_divergent(diffs)
    if not top:
        return "<div style='font-size:0.85em'>No token differs: both models score this answer the same.</div>"
    items = "; ".join(
        f"<code>{html.escape(repr(d.text))}</code> {d.log_ratio:+.2f} "
        f"(policy {d.policy_logprob:.2f}, reference {d.reference_logprob:.2f})"
        for d in top
    )
    return f"<div style='font-size:0.85em'>Most divergent tokens (log π/π_ref, nats): {items}</div>"


def divergence_html(diffs: Sequence[TokenDiff], title: str, scale: float = 2.0, note: str = "") -> str:
    """The response with each span coloured by its log-ratio (hover shows the numbers), under a KL header
    (and ``note``: what the sum measures) and above the most divergent tokens listed with their numbers."""
    if not diffs:
        return f"<div class='tandem-divergence'><b>{html.escape(title)}</b>: no tokens to score</div>"
    total = sequence_kl(diffs)
    spans = "".join(
        f"<span title='log π/π_ref = {d.log_ratio:+.3f} (policy {d.policy_logprob:.3f}, "
        f"reference {d.reference_logprob:.3f})' style='background:{ratio_color(d.log_ratio, scale)};"
        f"color:{text_color(d.log_ratio, scale)};border-radius:2px'>"
        f"{html.escape(d.text)}</span>"
        for d in diffs
    )
    measured = f"<div style='font-size:0.85em'>{html.escape(note)}</div>" if note else ""
    return (
        "<div class='tandem-divergence'>"
        f"<div><b>{html.escape(title)}</b>: Σ log π/π_ref = <b>{total:+.3f}</b> nats over {len(diffs)} tokens "
        f"(mean {total / len(diffs):+.3f})</div>{measured}"
        "<div style='white-space:pre-wrap;line-height:1.8;font-family:ui-monospace,monospace;font-size:0.9em'>"
        f"{spans}</div>{_top_html(diffs)}</div>"
    )


def legend_html(scale: float = 2.0) -> str:
    """The colour key under the Compare tab's answers, for full colour at ``|log-ratio| ≥ scale`` nats."""
    return (
        "<div style='font-size:0.85em'>"
        f"<span style='background:{ratio_color(scale, scale)};color:#fff'>&nbsp;blue&nbsp;</span>: your policy finds "
        f"this token likelier than the reference does; <span style='background:{ratio_color(-scale, scale)};"
        "color:#fff'>&nbsp;red&nbsp;</span>: the reference finds it likelier "
        f"(full colour at |log-ratio| ≥ {scale:g} nats; hover a token for its numbers). "
        "Both models score at temperature 1 with no top-p or top-k filter. Σ log π/π_ref sums that over the "
        "answer: on the policy's own answer it is a one-sample estimate of KL(policy ‖ reference), unbiased "
        "only when sampled at temperature 1, top-p 1, top-k off; on the reference's answer it says how much "
        "likelier the policy finds the reference's words.</div>"
    )


LEGEND_HTML = legend_html()
