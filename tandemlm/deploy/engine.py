"""The one interface every backend implements, and the shared logic built on it.

A backend subclasses :class:`BaseEngine` and supplies five primitives (render the chat template,
tokenize, stream tokens, score tokens, close). Everything users see — chat, generate, stop strings,
``<think>`` splitting, usage counts, context checks — lives here once, so every backend behaves
the same. The CLI, server and UI only ever see the :class:`Engine` protocol.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from tandemlm.deploy.textstream import ReasoningSplitter, StopStringFilter, prompt_opens_reasoning
from tandemlm.deploy.types import (
    Completion,
    ContextLengthError,
    Delta,
    EngineInfo,
    GeneratedToken,
    SamplingParams,
    Usage,
)
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message


@runtime_checkable
class Engine(Protocol):
    """What the CLI, server and UI rely on."""

    info: EngineInfo

    def chat(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Delta]:
        """Streams the assistant's reply to ``messages``, formatted with the model's chat template."""
        ...

    def generate(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        """Streams a raw completion of ``prompt`` (no chat template)."""
        ...

    def token_logprobs(self, messages: Sequence[Message], response: str) -> list[tuple[str, float]]:
        """Per-token log-probabilities of ``response`` as the assistant's reply to ``messages``."""
        ...

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of ``messages``."""
        ...

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for ``text``; special tokens written in the text are parsed as such."""
        ...

    def close(self) -> None:
        """Frees the model and any worker threads."""
        ...


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Checks OpenAI-style messages and returns them as plain dicts; errors name the bad message."""
    if not messages:
        raise EngineError("messages must contain at least one message")
    clean: list[Message] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise EngineError(f"messages[{index}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise EngineError(f"messages[{index}].role must be system, user, assistant or tool, got {role!r}")
        if not isinstance(content, str):
            raise EngineError(f"messages[{index}].content must be a string")
        clean.append({"role": role, "content": content})
    return clean


class BaseEngine(abc.ABC):
    """Shared chat/generate logic over a backend's token-level primitives."""

    info: EngineInfo

    # ---- primitives a backend supplies -------------------------------------------------------
    @abc.abstractmethod
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...

    @abc.abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def stream_tokens(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GeneratedToken]:
        """Yields generated tokens until an end-of-generation token or ``params.max_tokens``.

        Closing the iterator early must cancel the work and free the slot.
        """

    @abc.abstractmethod
    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        """Log-probability of each target token given the prompt and the targets before it."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str: ...

    def close(self) -> None:  # noqa: B027 - optional for backends with nothing to free
        """Frees resources; the default has nothing to free."""

    # ---- shared behaviour --------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], params: SamplingParams) -> Iterator[Delta]:
        prompt = self.render_chat(validate_messages(messages))
        ids = self.tokenize(prompt, add_special_tokens=False)
        return self._stream(ids, params, starts_in_reasoning=prompt_opens_reasoning(prompt))

    def generate(self, prompt: str, params: SamplingParams) -> Iterator[Delta]:
        if not isinstance(prompt, str) or not prompt:
            raise EngineError("prompt must be a non-empty string")
        ids = self.tokenize(prompt, add_special_tokens=True)
        return self._stream(ids, params, starts_in_reasoning=False, split_reasoning=False)

    def token_logprobs(self, messages: Sequence[Message], response: str) -> list[tuple[str, float]]:
        prompt = self.render_chat(validate_messages(messages))
        prompt_ids = self.tokenize(prompt, add_special_tokens=False)
        full_ids = self.tokenize(prompt + response, add_special_tokens=False)
        # Tokenizing prompt+response together keeps merges across the boundary as the model saw them.
        split = common_prefix_len(prompt_ids, full_ids)
        target = full_ids[split:]
        if not target:
            return []
        self.check_context(len(full_ids), 0)
        logprobs = self.score_tokens(full_ids[:split], target)
        return [(self.detokenize([tid]), lp) for tid, lp in zip(target, logprobs, strict=True)]

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        limit = self.info.context_length
        if prompt_len >= limit:
            raise ContextLengthError(
                f"prompt is {prompt_len} tokens but the model's context window is {limit} tokens"
            )
        if prompt_len + max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"context window of {limit} tokens; lower max_tokens to {limit - prompt_len} or less"
            )

    def _stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        starts_in_reasoning: bool,
        split_reasoning: bool = True,
    ) -> Iterator[Delta]:
        # Validate before returning the generator, so bad requests fail at call time, not mid-stream.
        self.check_context(len(prompt_ids), params.max_tokens)
        return self._stream_gen(prompt_ids, params, starts_in_reasoning, split_reasoning)

    def _stream_gen(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        starts_in_reasoning: bool,
        split_reasoning: bool,
    ) -> Iterator[Delta]:
        stops = StopStringFilter(params.stop)
        splitter = ReasoningSplitter(starts_in_reasoning) if split_reasoning else None
        usage = Usage(prompt_tokens=len(prompt_ids))
        finish: str = "length"
        tokens = self.stream_tokens(prompt_ids, params)
        try:
            for token in tokens:
                usage.completion_tokens += 1
                text = stops.feed(token.text)
                delta = self._split(splitter, text)
                if delta.text or delta.reasoning:
                    yield delta
                if stops.stopped:
                    finish = "stop"
                    break
            else:
                finish = "length" if usage.completion_tokens >= params.max_tokens else "stop"
        finally:
            tokens.close()
        tail = self._split(splitter, stops.flush())
        if splitter is not None:
            answer, reasoning = splitter.flush()
            tail.text += answer
            tail.reasoning += reasoning
        tail.finish_reason = finish  # type: ignore[assignment]
        tail.usage = usage
        yield tail

    @staticmethod
    def _split(splitter: ReasoningSplitter | None, text: str) -> Delta:
        if splitter is None:
            return Delta(text=text)
        answer, reasoning = splitter.feed(text)
        return Delta(text=answer, reasoning=reasoning)


def collect(stream: Iterator[Delta]) -> Completion:
    """Drains a stream into one :class:`Completion`."""
    text, reasoning = [], []
    finish, usage = "stop", Usage()
    for delta in stream:
        text.append(delta.text)
        reasoning.append(delta.reasoning)
        if delta.finish_reason:
            finish = delta.finish_reason
        if delta.usage:
            usage = delta.usage
    return Completion("".join(text), "".join(reasoning), finish, usage)  # type: ignore[arg-type]


def drain_tokens(out: queue.Queue[Any], cancelled: threading.Event) -> Iterator[GeneratedToken]:
    """Yields tokens a scheduler thread puts on ``out`` until ``None``; an exception put there is raised.

    Closing the iterator early sets ``cancelled``, which tells the scheduler to drop the request.
    """
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancelled.set()


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Number of leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
