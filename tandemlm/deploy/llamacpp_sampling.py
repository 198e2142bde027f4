"""Per-request sampling for the llama.cpp backend: sampler chains, raw log-probabilities, JSON grammars.

A request's chain is planned as plain data (:func:`plan_chain`: which ``llama_sampler_init_*`` calls,
with which arguments, fed which past tokens) and then built from llama.cpp's own samplers
(:func:`build_chain`), so what a request asks for can be checked without a model. JSON schemas
become GBNF through llama-cpp-python's converter (:func:`json_schema_gbnf`).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandemlm.deploy.types import GeneratedToken, OutputConstraint, SamplingParams
from tandemlm.errors import EngineError

PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over (prompt included)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


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


def plan_chain(params: SamplingParams, n_vocab: int, prompt: Sequence[int], grammar: str | None = None) -> list[Stage]:
    """The samplers, in order, that honour ``params`` (same order as the transformers backend).

    The grammar comes first so every later filter only chooses among tokens it allows. The
    repetition penalty also looks back over the prompt (as transformers' does); OpenAI's presence
    and frequency penalties get a sampler of their own that sees generated tokens only.
    """
    stages: list[Stage] = []
    if grammar is not None:
        stages.append(Stage("grammar", (grammar,)))
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


def build_chain(ll: Any, vocab: Any, stages: Sequence[Stage]) -> Any:
    """A llama.cpp sampler chain made of ``stages`` (the caller frees it); EngineError if one cannot be made."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    for stage in stages:
        sampler = _init_stage(ll, vocab, stage)
        if not sampler:
            ll.llama_sampler_free(chain)
            what = "the JSON grammar" if stage.kind == "grammar" else f"the {stage.kind} sampler"
            raise EngineError(f"llama.cpp rejected {what}")
        ll.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here
        for token in stage.history:
            ll.llama_sampler_accept(sampler, token)
    return chain


class RequestSampler:
    """One request's sampling: a llama.cpp chain, and a JSON grammar kept beside it (not in it).

    Masking the whole vocabulary with a grammar costs more than a small model's decode step, so a
    constrained request samples the way llama.cpp's own tools do: the chain picks from the raw
    logits, the grammar checks that one token, and only when it is refused does the chain pick
    again from logits the grammar has masked. Greedy picks are the same as masking first; sampled
    ones follow the masked distribution. Samplers only learn a token once it is chosen.
    """

    def __init__(self, ll: Any, vocab: Any, stages: Sequence[Stage], n_vocab: int) -> None:
        self._ll = ll
        grammar = [stage for stage in stages if stage.kind == "grammar"]
        self.grammar = build_chain(ll, vocab, grammar) if grammar else None
        try:
            self.chain = build_chain(ll, vocab, [stage for stage in stages if stage.kind != "grammar"])
        except EngineError:
            self.free()
            raise
        if self.grammar is not None:
            self._data = (ll.llama_token_data * n_vocab)()
            self._view = np.ctypeslib.as_array(self._data)
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = (ll.llama_token_data * 1)()

    def sample(self, ctx: Any, index: int, logits: Any) -> int:
        """The next token from batch output ``index``; ``logits(index)`` gives that row of raw logits."""
        if self.grammar is None:
            return int(self._ll.llama_sampler_sample(self.chain, ctx, index))
        row = logits(index)
        token = self._pick(row, masked=False)
        if not self._allowed(token):
            token = self._pick(row, masked=True)
        self._ll.llama_sampler_accept(self.grammar, token)
        self._ll.llama_sampler_accept(self.chain, token)
        return token

    def _pick(self, row: np.ndarray, masked: bool) -> int:
        self._view["id"], self._view["logit"], self._view["p"] = self._ids, row, 0.0  # samplers reorder in place
        candidates = self._ll.llama_token_data_array(data=self._data, size=len(self._data), selected=-1, sorted=False)
        if masked:
            self._ll.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        self._ll.llama_sampler_apply(self.chain, ctypes.byref(candidates))
        return int(candidates.data[candidates.selected].id)

    def _allowed(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        single = self._ll.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._ll.llama_sampler_apply(self.grammar, ctypes.byref(single))
        return bool(np.isfinite(self._one[0].logit))

    def free(self) -> None:
        for name in ("grammar", "chain"):
            sampler = getattr(self, name, None)
            if sampler is not None:
                self._ll.llama_sampler_free(sampler)
                setattr(self, name, None)


def _init_stage(ll: Any, vocab: Any, stage: Stage) -> Any:
    if stage.kind == "grammar":
        return ll.llama_sampler_init_grammar(vocab, stage.args[0].encode("utf-8"), b"root")
    if stage.kind == "logit_bias":
        n_vocab, biases = stage.args
        array = (ll.llama_logit_bias * len(biases))()
        for item, (token, bias) in zip(array, biases, strict=True):
            item.token, item.bias = token, bias
        return ll.llama_sampler_init_logit_bias(n_vocab, len(biases), array)  # llama.cpp copies the array
    return getattr(ll, f"llama_sampler_init_{stage.kind}")(*stage.args)


def json_schema_gbnf(constraint: OutputConstraint) -> str:
    """GBNF for ``constraint`` (any JSON object when it has no schema); an EngineError (one line) if the
    schema is invalid or uses something llama-cpp-python's converter does not support."""
    schema = ANY_OBJECT if constraint.json_schema is None else constraint.json_schema
    if not isinstance(schema, dict):
        raise EngineError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise EngineError(_one_line(f"invalid JSON schema: {exc}")) from None
    return _convert(text)


@functools.lru_cache(maxsize=64)
def _convert(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(schema_json)
    except RecursionError:
        raise EngineError("unsupported JSON schema: it nests or refers to itself too deeply") from None
    except Exception as exc:  # noqa: BLE001 - the converter signals bad schemas with assorted exceptions
        reason = str(exc) or type(exc).__name__
        if "--allow-fetch" in reason:  # the converter's CLI advice means nothing to an API caller
            reason = "a $ref to a remote schema (only local #/... references are resolved)"
        raise EngineError(_one_line(f"unsupported JSON schema: {reason}")) from None
    # The converter's string characters admit raw control characters, which JSON forbids (and
    # json.loads rejects); newer llama.cpp grammars exclude them the same way.
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


def _one_line(text: str) -> str:
    return " ".join(text.split())


def apply_chain(ll: Any, chain: Any, logits: Sequence[float]) -> int:
    """The token ``chain`` picks from ``logits`` without accepting it (for checking chains without a model)."""
    n = len(logits)
    data = (ll.llama_token_data * n)()
    for i, value in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(value), 0.0
    array = ll.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    ll.llama_sampler_apply(chain, ctypes.byref(array))
    return int(array.data[array.selected].id)
