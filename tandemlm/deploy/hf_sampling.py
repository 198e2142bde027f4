"""Per-request sampling for the transformers backend: logits processors, log-probabilities, JSON grammars.

Each request (row of a batch) gets a :class:`RowSampler` built from its :class:`SamplingParams`:
transformers' own logits processors where they exist (repetition penalty, logit bias, temperature,
top-k, top-p, min-p), a small one for OpenAI's presence/frequency penalties, and an llguidance
matcher (:mod:`tandemlm.deploy.constraints`) that masks every token a JSON schema does not allow.
Log-probabilities are always the model's own (log-softmax of the raw logits), the same numbers
``score_tokens`` gives.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tandemlm.deploy.constraints import Grammars, Matcher
from tandemlm.deploy.types import GeneratedToken, OutputConstraint, SamplingParams
from tandemlm.errors import EngineError


def logprob_records(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> list[GeneratedToken]:
    """Each row's log-softmax at ``tokens[i]``, with the ``top`` most likely alternatives (most likely first).

    The one place raw log-probabilities are taken: scoring, prompt log-probs and generated tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, index)[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        alternatives = [[] for _ in chosen]
    return [GeneratedToken(t, "", lp, alt) for t, lp, alt in zip(tokens, chosen, alternatives, strict=True)]


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logits[t] - presence * (counts[t] > 0) - frequency * counts[t]``."""
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


class OpenAIPenalties(LogitsProcessor):
    """Presence and frequency penalties over the tokens generated so far (the prompt does not count)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return penalize(scores, counts, self.presence, self.frequency)


class JsonGrammars(Grammars):
    """llguidance (:mod:`tandemlm.deploy.constraints`) for a transformers tokenizer, masking torch logits."""

    def __init__(self, hf_tokenizer: Any, eos_ids: Collection[int]) -> None:
        super().__init__(functools.partial(_lltokenizer, hf_tokenizer, sorted(eos_ids)))

    def matcher(self, constraint: OutputConstraint) -> GrammarMask:  # type: ignore[override]
        return GrammarMask(super().matcher(constraint))


def _lltokenizer(hf_tokenizer: Any, eos_ids: list[int]) -> Any:
    import llguidance.hf

    try:
        return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos_ids)
    except ValueError as exc:
        raise EngineError(f"response_format needs a fast (tokenizers) tokenizer: {exc}") from None


class GrammarMask(LogitsProcessor):
    """Sets every token the grammar does not allow next to -inf; once it is complete only EOS is allowed.

    Tokens past the tokenizer's vocabulary (padded embeddings) are never allowed.
    """

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher

    def allowed(self, width: int) -> torch.Tensor:
        """Bool mask of the ``width`` logits the grammar allows now."""
        return torch.from_numpy(self.matcher.allowed(width))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed(scores.shape[-1]).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume(token)


class RowSampler:
    """Per-request sampling with transformers' logits processors, a seeded generator and an optional grammar."""

    def __init__(
        self, params: SamplingParams, device: Any, prompt_len: int = 0, grammar: GrammarMask | None = None
    ) -> None:
        self.params, self.grammar = params, grammar
        self.processors = LogitsProcessorList(_processors(params, prompt_len, grammar))
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def sample(self, history: torch.Tensor, logits: torch.Tensor) -> int:
        """The next token for a ``(1, vocab)`` row of logits after ``history`` (prompt plus generated ids)."""
        scores = self.processors(history, logits)  # every processor returns a new tensor; logits stay raw
        if self.params.greedy:
            token = int(scores.argmax(-1).item())
        else:
            probs = torch.softmax(scores, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=self.generator).item())
        if self.grammar is not None:
            self.grammar.consume(token)
        return token

    def step(self, history: torch.Tensor, logits: torch.Tensor) -> GeneratedToken:
        """Samples a token and, when the request asked for them, its raw log-probability and alternatives."""
        token = self.sample(history, logits)
        if self.params.logprobs is None:
            return GeneratedToken(token, "")
        return logprob_records(logits, [token], self.params.logprobs)[0]


def _processors(params: SamplingParams, prompt_len: int, grammar: GrammarMask | None) -> list[LogitsProcessor]:
    processors: list[LogitsProcessor] = []
    if grammar is not None:  # first, so the filters below only ever choose among allowed tokens
        processors.append(grammar)
    if params.logit_bias:
        processors.append(SequenceBiasLogitsProcessor({(t,): b for t, b in params.logit_bias.items()}))
    if params.penalised:
        processors.append(OpenAIPenalties(prompt_len, params.presence_penalty, params.frequency_penalty))
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0.0:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors
