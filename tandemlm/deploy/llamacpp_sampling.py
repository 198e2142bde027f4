"""Per-request sampling for the llama.cpp backend: sampler chains, raw log-probabilities, JSON grammars.

A request's chain is planned as plain data (:func:`plan_chain`: which ``llama_sampler_init_*`` calls,
with which arguments, fed which past tokens) and then built from llama.cpp's own samplers
(:func:`build_chain`), so what a request asks for can be checked without a model. JSON schemas are
enforced by an llguidance matcher beside the chain (:mod:`tandemlm.deploy.constraints`, as on the
other backends), not by a grammar sampler in it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandemlm.deploy.constraints import Matcher
from tandemlm.deploy.types import GeneratedToken, SamplingParams
from tandemlm.errors import EngineError

PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over (prompt included)


def logprob_record(logits: np.ndarray, token: int, top: int = 0) -> GeneratedToken:
    """``token``'s log-softmax under one row of raw logits, with the ``top`` most likely alternatives.

    The one place raw log-probabilities are taken: scoring, prompt log-probs and generated tokens.
    """
    row = logits.astype(np.float64)
    peak = float(row.max())
    log_norm = peak + float(np.log(np.exp(row - peak).sum()))
    alternatives: list[tuple[int, float]] = []
    if top:
        k = min(top, row.shape[0])
        best = np.argpartition(-row, k - 1)[:k]
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = [(int(t), float(row[t]) - log_norm) for t in best]
    return GeneratedToken(int(token), "", float(row[token]) - log_norm, alternatives)


@dataclass(frozen=True)
class Stage:
    """One sampler of a chain: ``llama_sampler_init_<kind>(*args)``, then fed ``history`` (oldest first)."""

    kind: str
    args: tuple[Any, ...] = ()
    history: tuple[int, ...] = ()


def plan_chain(params: SamplingParams, n_vocab: int, prompt: Sequence[int]) -> list[Stage]:
    """The samplers, in order, that honour ``params`` (same order as the transformers backend).

    A JSON grammar is not one of them: :class:`RequestSampler` checks the chain's pick against it
    and, when it is refused, lets the chain pick again from masked logits. The repetition penalty also
    looks back over the prompt (as transformers' does); OpenAI's presence and frequency penalties
    get a sampler of their own that sees generated tokens only.
    """
    stages: list[Stage] = []
    if params.logit_bias:
        stages.append(Stage("logit_bias", (n_vocab, tuple(sorted(params.logit_bias.items())))))
    if params.penalised:
        window = max(params.max_tokens or n_vocab, 1)  # every generated token counts
        stages.append(Stage("penalties", (n_vocab, window, 1.0, params.frequency_penalty, params.presence_penalty)))
    if params.repetition_penalty != 1.0:
        args = (n_vocab, PENALTY_LAST_N, params.repetition_penalty, 0.0, 0.0)
        stages.append(Stage("penalties", args, tuple(prompt[-PENALTY_LAST_N:])))
    if params.greedy:
        stages.append(Stage("greedy"))
        return stages
    stages.append(Stage("temp", (params.temperature,)))
    if params.top_k > 0:
        stages.append(Stage("top_k", (params.top_k,)))
    if params.top_p < 1.0:
        stages.append(Stage("top_p", (params.top_p, 1)))
    if params.min_p > 0.0:
        stages.append(Stage("min_p", (params.min_p, 1)))
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    stages.append(Stage("dist", (seed & 0xFFFFFFFF,)))
    return stages


def build_chain(ll: Any, stages: Sequence[Stage]) -> Any:
    """A llama.cpp sampler chain made of ``stages`` (the caller frees it); EngineError if one cannot be made."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    for stage in stages:
        sampler = _init_stage(ll, stage)
        if not sampler:
            ll.llama_sampler_free(chain)
            raise EngineError(f"llama.cpp rejected the {stage.kind} sampler")
        ll.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here
        for token in stage.history:
            ll.llama_sampler_accept(sampler, token)
    return chain


class RequestSampler:
    """One request's sampling: a llama.cpp chain, and an llguidance matcher kept beside it (not in it).

    Checking one token is far cheaper than masking the whole vocabulary (whose cost grows with the
    grammar), so a constrained request samples the way llama.cpp's common sampler does: the chain
    picks from the raw logits, the matcher checks that one token, and only when it is refused does
    the chain pick again from logits the grammar has masked (-inf). Greedy picks are the same as masking first;
    sampled ones follow the masked distribution. Applying the chain only reads and draws (the
    second pick draws again from its RNG, as llama.cpp's does); its samplers, penalties included,
    learn a token once, after it is chosen. The engine's logits row is never written.
    """

    def __init__(self, ll: Any, stages: Sequence[Stage], n_vocab: int, matcher: Matcher | None = None) -> None:
        self._ll, self.matcher = ll, matcher
        self.chain = build_chain(ll, stages)
        self.refusals = 0  # picks the grammar refused, so the chain picked again from masked logits
        if matcher is not None:
            self._data = (ll.llama_token_data * n_vocab)()
            self._view = np.ctypeslib.as_array(self._data)
            self._ids = np.arange(n_vocab, dtype=np.int32)

    def sample(self, ctx: Any, index: int, logits: Any) -> int:
        """The next token from batch output ``index``; ``logits(index)`` gives that row of raw logits."""
        if self.matcher is None:
            return int(self._ll.llama_sampler_sample(self.chain, ctx, index))
        row = logits(index)
        token = self._pick(row)
        if not self.matcher.allows(token):
            self.refusals += 1
            token = self._pick(row, self.matcher.allowed(len(row)))
        self.matcher.consume(token)  # an EngineError if even the masked pick is refused (a broken grammar)
        self._ll.llama_sampler_accept(self.chain, token)
        return token

    def _pick(self, row: np.ndarray, allowed: np.ndarray | None = None) -> int:
        """The token the chain picks from ``row`` (only among ``allowed``), without accepting it."""
        self._view["id"], self._view["logit"], self._view["p"] = self._ids, row, 0.0  # samplers reorder in place
        if allowed is not None:
            self._view["logit"][~allowed] = -np.inf
        candidates = self._ll.llama_token_data_array(data=self._data, size=len(self._data), selected=-1, sorted=False)
        self._ll.llama_sampler_apply(self.chain, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def free(self) -> None:
        if self.chain is not None:
            self._ll.llama_sampler_free(self.chain)
            self.chain = None


def _init_stage(ll: Any, stage: Stage) -> Any:
    if stage.kind == "logit_bias":
        n_vocab, biases = stage.args
        array = (ll.llama_logit_bias * len(biases))()
        for item, (token, bias) in zip(array, biases, strict=True):
            item.token, item.bias = token, bias
        return ll.llama_sampler_init_logit_bias(n_vocab, len(biases), array)  # llama.cpp copies the array
    return getattr(ll, f"llama_sampler_init_{stage.kind}")(*stage.args)


def apply_chain(ll: Any, chain: Any, logits: Sequence[float]) -> int:
    """The token ``chain`` picks from ``logits`` without accepting it (for checking chains without a model)."""
    n = len(logits)
    data = (ll.llama_token_data * n)()
    for i, value in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(value), 0.0
    array = ll.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    ll.llama_sampler_apply(chain, ctypes.byref(array))
    return int(array.data[array.selected].id)
