"""Plain data shared by every backend: sampling parameters, stream deltas, usage counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from tandemlm.errors import EngineError

FinishReason = Literal["stop", "length", "cancelled"]


class ContextLengthError(EngineError):
    """The prompt (plus the requested completion) does not fit the model's context window."""


def _finite(name: str, value: float, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return float(value)


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class OutputConstraint:
    """What the decoder must produce, enforced by each backend's grammar engine (never by prompting).

    ``json_schema=None`` means any JSON object (OpenAI's ``response_format: json_object``).
    """

    json_schema: dict[str, Any] | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling settings, named as in the OpenAI API; one set for every backend.

    ``temperature=0`` means greedy decoding. ``top_k=0`` (or -1), ``top_p=1`` and ``min_p=0`` disable
    those filters. ``max_tokens=None`` means as many as the context window leaves. ``logprobs=k``
    reports each sampled token's log-probability under the model (before any sampling filter) and
    the ``k`` most likely alternatives (0: none). ``logit_bias`` maps token ids to additive biases.
    """

    max_tokens: int | None = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    constraint: OutputConstraint | None = None
    adapter: str | None = None  # a loaded LoRA adapter's name; None: the base model alone

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.temperature = _finite("temperature", self.temperature, 0.0, 100.0)
        self.top_p = _finite("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be greater than 0, got 0")
        if self.top_k == -1:  # vLLM's and OpenAI-style clients' spelling of "off"
            self.top_k = 0
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (or -1 for off), got {self.top_k!r}")
        self.min_p = _finite("min_p", self.min_p, 0.0, 1.0)
        self.presence_penalty = _finite("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        self._check_logit_bias()
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        self.repetition_penalty = _finite("repetition_penalty", self.repetition_penalty, 0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be greater than 0, got 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise ValueError(f"adapter must be a non-empty name, got {self.adapter!r}")

    def _check_logit_bias(self) -> None:
        clean: dict[int, float] = {}
        for key, bias in dict(self.logit_bias).items():
            token = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            clean[token] = _finite(f"logit_bias[{key}]", bias, -100.0, 100.0)
        self.logit_bias = clean

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """True when OpenAI's presence or frequency penalty is on."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def features_used(self) -> list[str]:
        """Names of the optional settings this request turns on (a backend must honour each or refuse)."""
        used = {
            "min_p": self.min_p > 0.0,
            "presence_penalty": self.presence_penalty != 0.0,
            "frequency_penalty": self.frequency_penalty != 0.0,
            "logit_bias": bool(self.logit_bias),
            "logprobs": self.logprobs is not None,
            "top_logprobs": bool(self.logprobs),
            "response_format": self.constraint is not None,
            "adapter": self.adapter is not None,
        }
        return [name for name, on in used.items() if on]


OPTIONAL_FEATURES = frozenset(
    {"min_p", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "adapter"}
)
"""Every name :meth:`SamplingParams.features_used` can return: what a full model backend honours."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GeneratedToken:
    """One token from a backend's decode loop. ``text`` may be empty while a UTF-8 character is incomplete.

    ``logprob`` and ``top_logprobs`` (token id, log-probability; most likely first) are filled when
    the request asked for log-probabilities: the model's own distribution, before sampling filters.
    ``end`` marks the end-of-generation token a generation stopped on: the last token, with no text,
    scored like any other (as vLLM keeps it in its token ids and log-probabilities), not counted in usage.
    """

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    end: bool = False


@dataclass
class TokenLogprob:
    """A token with its log-probability, as OpenAI reports it (``top`` holds the alternatives)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Delta:
    """One streamed piece of a response: answer text and reasoning text kept apart.

    The last delta of a stream carries ``finish_reason`` and ``usage``.
    """

    text: str = ""
    reasoning: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    """A whole response, gathered from a stream."""

    text: str
    reasoning: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class EngineInfo:
    backend: str
    model_id: str
    context_length: int
    has_chat_template: bool = True
