"""Plain data shared by every backend: sampling parameters, stream deltas, usage counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

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


@dataclass
class SamplingParams:
    """Sampling settings, named as in the OpenAI API; one set for every backend.

    ``temperature=0`` means greedy decoding. ``top_k=0`` and ``top_p=1`` disable those filters.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.temperature = _finite("temperature", self.temperature, 0.0, 100.0)
        self.top_p = _finite("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be greater than 0, got 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        self.repetition_penalty = _finite("repetition_penalty", self.repetition_penalty, 0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be greater than 0, got 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GeneratedToken:
    """One token from a backend's decode loop. ``text`` may be empty while a UTF-8 character is incomplete."""

    token_id: int
    text: str


@dataclass
class Delta:
    """One streamed piece of a response: answer text and reasoning text kept apart.

    The last delta of a stream carries ``finish_reason`` and ``usage``.
    """

    text: str = ""
    reasoning: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    """A whole response, gathered from a stream."""

    text: str
    reasoning: str
    finish_reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class EngineInfo:
    backend: str
    model_id: str
    context_length: int
    has_chat_template: bool = True
