"""Structured output through llguidance, whatever the backend: JSON schemas to grammars, grammars to matchers.

The transformers and llama.cpp backends both enforce an :class:`OutputConstraint` with llguidance
(vLLM with its own llguidance backend, fed the same :data:`JSON_OPTIONS`), so every backend accepts
the same schemas and honours every keyword it accepts; a schema llguidance cannot honour is refused
with a one-line :class:`EngineError`, never partly ignored. A backend supplies only the llguidance
tokenizer (``llguidance.hf.from_tokenizer``, ``llguidance.llamacpp.lltokenizer_from_vocab``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from tandemlm.deploy.types import OutputConstraint
from tandemlm.errors import EngineError

# Compact JSON with the usual ", " and ": " separators: flexible whitespace lets a weak model emit
# blanks forever without ever closing the object.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def one_line(text: str) -> str:
    return " ".join(text.split())


def constraint_schema(constraint: OutputConstraint) -> Any:
    """The JSON schema ``constraint`` asks for (any JSON object when it has none), objects closed to keys
    they do not list (:func:`closed_objects`): the one rule for ``response_format`` and forced tool calls."""
    return ANY_OBJECT if constraint.json_schema is None else closed_objects(constraint.json_schema)


# Keywords whose value is a schema or a list of schemas, and those whose value maps names to schemas.
_SUBSCHEMAS = (
    "items", "prefixItems", "additionalItems", "contains", "anyOf", "oneOf", "not", "if", "then", "else",
    "propertyNames", "additionalProperties",
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any, close: bool = True) -> Any:
    """A copy of ``schema`` whose objects take only the keys they list: ``additionalProperties: false``
    wherever ``properties`` is given and nothing is said about other keys (as llama.cpp's
    schema-to-grammar and xgrammar's strict mode read such a schema; JSON Schema itself would allow any
    key, and a weak model then invents keys until max_tokens cuts it off). An explicit
    ``additionalProperties`` stays as it is. The branches of an ``allOf`` and an object holding one (or a
    ``$ref`` or ``unevaluatedProperties``) stay open: their keys add up across schemas.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed_objects(branch, close=False) for branch in out["allOf"]]
    open_ended = any(key in out for key in ("additionalProperties", "allOf", "$ref", "unevaluatedProperties"))
    if close and isinstance(out.get("properties"), dict) and not open_ended:
        out["additionalProperties"] = False
    return out


def schema_grammar(constraint: OutputConstraint) -> str:
    """The llguidance grammar for ``constraint``, not yet checked; EngineError (one line) if it is no JSON object."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(constraint_schema(constraint), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise EngineError(one_line(f"invalid JSON schema: {exc}")) from None


class Grammars:
    """llguidance for one tokenizer: checks constraints and builds a :class:`Matcher` per request.

    ``build_tokenizer()`` makes the llguidance tokenizer (about a second), so it runs on first use,
    once. Its end-of-generation tokens (``eos_token``: give it every one the model may end with)
    are the only tokens a complete grammar allows.
    """

    def __init__(self, build_tokenizer: Callable[[], Any]) -> None:
        self._build = build_tokenizer
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
            return self._tokenizer

    def grammar(self, constraint: OutputConstraint) -> str:
        """The checked llguidance grammar for ``constraint``; an EngineError (one line) if the schema is bad."""
        from llguidance import LLMatcher

        grammar = schema_grammar(constraint)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer())
        if is_error:
            raise EngineError(one_line(f"invalid JSON schema: {messages[0] if messages else 'rejected'}"))
        return grammar

    def matcher(self, constraint: OutputConstraint) -> Matcher:
        from llguidance import LLMatcher

        tokenizer = self.tokenizer()
        matcher = LLMatcher(tokenizer, self.grammar(constraint), log_level=0)
        if matcher.is_error():
            raise EngineError(one_line(f"invalid JSON schema: {matcher.get_error()}"))
        return Matcher(matcher, frozenset(tokenizer.eos_tokens), tokenizer.vocab_size)


class Matcher:
    """One request's place in its grammar: which tokens may come next, and the tokens it has taken.

    Once the grammar is complete only an end-of-generation token is allowed; tokens past the
    llguidance tokenizer's vocabulary (padded embeddings) never are.
    """

    def __init__(self, matcher: Any, eos: frozenset[int], vocab_size: int) -> None:
        self.matcher, self.eos, self.vocab_size = matcher, eos, vocab_size
        self._eos_ids = np.array(sorted(eos), dtype=np.int64)
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # llguidance's bitmask, reused each step

    def allowed(self, width: int) -> np.ndarray:
        """Bool mask of the ``width`` logits the grammar allows now."""
        allowed = np.zeros(width, dtype=bool)
        if self.matcher.is_stopped():  # complete: nothing but an end-of-generation token
            allowed[self._eos_ids[self._eos_ids < width]] = True
            return allowed
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # bit j of byte i: token 8 i + j
        n = min(width, self.vocab_size)
        allowed[:n] = bits[:n]
        return allowed

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next: one token checked, far cheaper than the whole mask."""
        if token in self.eos:
            return self.matcher.is_accepting() or self.matcher.is_stopped()
        return not self.matcher.is_stopped() and self.matcher.validate_tokens([token]) == 1

    def consume(self, token: int) -> None:
        """Moves past ``token``; an EngineError if the grammar does not allow it."""
        if token in self.eos:
            return
        if not self.matcher.consume_token(token):
            raise EngineError(one_line(f"the JSON grammar rejected token {token}: {self.matcher.get_error()}"))
