"""What the Compare tab scores, and the one line that says what the number measures.

Each answer is scored under both models with ``token_logprobs``: the models' own log-probabilities
(log-softmax of the raw logits), that is at temperature 1 with no top-p or top-k filter, whatever
the answer was sampled with. ``Σ log π/π_ref`` over the policy's answer is then a one-sample
estimate of ``KL(policy ‖ reference)``, unbiased only when the answer was itself sampled at
temperature 1, top-p 1, top-k off; :func:`measure_note` says which case a comparison is.

Reasoning models: an R1-style chat template ends the prompt inside an open ``<think>`` block, so
what such a model sampled is ``reasoning</think>\\n\\nanswer``; a model whose template does not
open the block writes ``<think>`` itself. Scoring only the answer right after an open ``<think>``
would score it as if it were the reasoning. So the scored text is rebuilt the same way for both
models and both sides: the reasoning block and the answer, with the part a model's prompt already
holds (``<think>\\n``) left out of its text, and only the span the label names counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.textstream import THINK_CLOSE, THINK_OPEN, prompt_opens_reasoning
from tandemlm.deploy.types import SamplingParams
from tandemlm.models.chat_template import Message
from tandemlm.ui.compare.divergence import TokenDiff, TokenLogprobs, divergence_html

THINK_HEAD = f"{THINK_OPEN}\n"
THINK_TAIL = f"{THINK_CLOSE}\n\n"  # R1's separator; the stream drops the blank lines, so they are put back here
HIDDEN = "<div class='tandem-divergence'><i>Divergence hidden until you vote (blind battle).</i></div>"


@dataclass(frozen=True)
class Continuation:
    """An answer as sampled after a prompt that does not open ``<think>``, and where counting starts."""

    text: str
    reasoning_start: int  # counting from here includes the reasoning block's content
    answer_start: int  # counting from here scores the answer alone (the reasoning is then context)


def continuation(reasoning: str, answer: str) -> Continuation:
    """The text a side sampled: ``<think>\\nreasoning</think>\\n\\nanswer``, or just the answer without reasoning.

    Reasoning without an answer is taken as a block the model never closed (it ran out of tokens),
    so no ``</think>`` it did not write is scored.
    """
    if not reasoning:
        return Continuation(answer, 0, 0)
    # A template that opens the block leaves "\n" in the prompt; a model that opens it itself
    # emits that "\n" as the reasoning's first character: both become the same text here.
    text = THINK_HEAD + reasoning.removeprefix("\n") + (THINK_TAIL + answer if answer else "")
    return Continuation(text, len(THINK_HEAD), len(text) - len(answer))


def after_prompt(prompt: str, sampled: Continuation, start: int) -> tuple[str, int]:
    """(the text to score after ``prompt``, how many of its leading characters not to count).

    A prompt that opens ``<think>`` already holds the block's opening (dropped from the text); an
    answer without reasoning gets an empty block closed before it there, as R1 writes one.
    """
    if not prompt_opens_reasoning(prompt):
        return sampled.text, start
    opening = prompt[prompt.rfind(THINK_OPEN) :]  # "<think>" and the whitespace after it
    if sampled.text.startswith(THINK_OPEN):
        held = opening if sampled.text.startswith(opening) else THINK_OPEN
        return sampled.text[len(held) :], max(start - len(held), 0)
    return THINK_TAIL + sampled.text, start + len(THINK_TAIL)


def drop_prefix(tokens: TokenLogprobs, chars: int) -> list[tuple[str, float]]:
    """``tokens`` without the ones covering the first ``chars`` characters of their text.

    A token across the cut keeps its log-probability and loses the text before the cut: the
    boundaries here (after ``</think>``'s blank lines, after ``<think>\\n``) are token boundaries
    for the tokenizers seen so far, so this is rare.
    """
    kept, seen = [], 0
    for text, logprob in tokens:
        end = seen + len(text)
        if end > chars:
            kept.append((text[max(chars - seen, 0) :], logprob))
        seen = end
    return kept


def score_answer(
    engine: Engine, messages: Sequence[Message], reasoning: str, answer: str, include_reasoning: bool = True
) -> list[tuple[str, float]]:
    """Per-token log-probs (T=1, no filter) of one side's answer after ``messages``, under ``engine``.

    With ``include_reasoning`` the reasoning block is scored with the answer, else the answer alone
    is, after its reasoning; either way every model scores the same text of the same side.
    """
    sampled = continuation(reasoning, answer)
    start = sampled.reasoning_start if include_reasoning else sampled.answer_start
    text, skip = after_prompt(engine.render_chat(messages), sampled, start)
    return drop_prefix(engine.token_logprobs(messages, text), skip)


def unbiased(params: SamplingParams) -> bool:
    """Whether answers sampled with ``params`` come from the model's own distribution (T=1, no filter)."""
    return params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0


def at_temperature_one(params: SamplingParams) -> SamplingParams:
    """``params`` sampling from the models' own distributions: temperature 1, top-p 1, top-k off.

    What Compare's "unbiased KL" box sends both sides instead of the sliders' values, so that
    ``Σ log π/π_ref`` over the policy's answer is an unbiased estimate (:func:`unbiased` holds);
    max tokens, seed and every other setting are kept.
    """
    return dataclasses.replace(params, temperature=1.0, top_p=1.0, top_k=0)


def measure_note(role: str, params: SamplingParams, reasoning: str = "", include_reasoning: bool = True) -> str:
    """One sentence saying exactly what ``Σ log π/π_ref`` over ``role``'s answer measures here."""
    scope = "reasoning and answer" if reasoning and include_reasoning else "answer"
    if reasoning and not include_reasoning:
        scope += " (after its reasoning, not scored)"
    what = (
        "a one-sample estimate of KL(policy ‖ reference)"
        if role == "policy"
        else "minus a one-sample estimate of KL(reference ‖ policy): how much likelier the policy finds these words"
    )
    if unbiased(params):
        sampled = "unbiased: this answer was sampled at T=1, top-p 1"
    else:
        top_k = f", top-k {params.top_k}" if params.top_k else ""
        sampled = (
            f"biased: this answer was sampled at T={params.temperature:g}, top-p {params.top_p:g}{top_k}, "
            "not T=1, top-p 1, top-k off"
        )
    return f"Scored at T=1, top-p 1 (both models' own probabilities) over the {role}'s {scope}: {what}; {sampled}."


@dataclass(frozen=True)
class ScoredAnswer:
    """One side's answer scored under both models, kept so the view can be redrawn at another scale."""

    title: str
    diffs: list[TokenDiff] | None
    note: str = ""
    error: str = ""

    def html(self, scale: float = 2.0) -> str:
        """The coloured view with full colour at ``|log π/π_ref| ≥ scale`` nats, or the scoring error."""
        if self.diffs is None:
            return f"<div>⚠ could not score the {self.title}: {self.error}</div>"
        return divergence_html(self.diffs, self.title, scale, self.note)
