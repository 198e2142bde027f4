"""The one interface every backend implements, and the shared logic built on it.

A backend subclasses :class:`BaseEngine` and supplies five primitives (render the chat template,
tokenize, stream tokens, score tokens, close). Everything users see — chat, generate, stop strings,
``<think>`` splitting, usage counts, context checks — lives here once, so every backend behaves
the same. The CLI, server and UI only ever see the :class:`Engine` protocol.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tandemlm.deploy.messages import validate_messages
from tandemlm.deploy.scheduling import CancellableStream, common_prefix_len
from tandemlm.deploy.textstream import THINK_CLOSE, ReasoningSplitter, StopStringFilter, prompt_opens_reasoning
from tandemlm.deploy.types import (
    Completion,
    ContextLengthError,
    Delta,
    EngineInfo,
    GeneratedToken,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message


@runtime_checkable
class Engine(Protocol):
    """What the CLI, server and UI rely on."""

    info: EngineInfo

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, tools: Sequence[dict[str, Any]] | None = None
    ) -> Iterator[Delta]:
        """Streams the assistant's reply to ``messages`` (and ``tools``), formatted with the model's chat template."""
        ...

    def generate(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Delta]:
        """Streams a raw completion of ``prompt`` (text, or token ids; no chat template)."""
        ...

    def token_logprobs(self, messages: Sequence[Message], response: str) -> list[tuple[str, float]]:
        """Per-token log-probabilities of ``response`` as the assistant's reply to ``messages``."""
        ...

    def prompt_logprobs(self, prompt_ids: list[int], target_ids: list[int], top: int = 0) -> list[GeneratedToken]:
        """Each target token's log-probability after the prompt and the targets before it, with ``top`` alternatives."""
        ...

    def token_logprob(self, token: GeneratedToken) -> TokenLogprob:
        """The OpenAI-shaped record (text, bytes, alternatives) of a token that carries a log-probability."""
        ...

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """One L2-normalised vector per token list: the mean of the last layer's hidden states over its tokens."""
        ...

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text the chat template makes of ``messages`` (and ``tools``)."""
        ...

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for ``text``; special tokens written in the text are parsed as such."""
        ...

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (special tokens left out)."""
        ...

    def chat_template_source(self) -> str | None:
        """The Jinja chat template the model carries, or None."""
        ...

    def check_token_ids(self, ids: list[int]) -> list[int]:
        """``ids`` if each is a token id of this model; otherwise an EngineError naming the first bad one."""
        ...

    def special_tokens(self) -> dict[str, str | None]:
        """The text of the model's ``bos_token``, ``eos_token`` and ``pad_token`` (None where it has none)."""
        ...

    def check_params(self, params: SamplingParams) -> None:
        """Raises EngineError naming a setting of ``params`` this engine cannot honour."""
        ...

    def counters(self) -> dict[str, int]:
        """Monotonic counts of the engine's own work (prompt tokens prefilled, drafted tokens...) for ``/metrics``."""
        ...

    def close(self) -> None:
        """Frees the model and any worker threads."""
        ...


class BaseEngine(abc.ABC):
    """Shared chat/generate logic over a backend's token-level primitives."""

    info: EngineInfo
    # Optional sampling settings (SamplingParams.features_used names) this backend honours; any
    # other one a request sets is refused, never silently ignored.
    features: frozenset[str] = frozenset()
    _longest_token: int | None = None

    # ---- primitives a backend supplies -------------------------------------------------------
    @abc.abstractmethod
    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str: ...

    def chat_template_source(self) -> str | None:
        """The model's Jinja chat template; None when it has none (the default)."""
        return None

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Embeddings; a backend that cannot make them says so (the default). Those that can check their
        inputs with :func:`check_embed_inputs`."""
        raise EngineError(f"the {self.info.backend} backend does not compute embeddings")

    def counters(self) -> dict[str, int]:
        """Monotonic counts of the engine's own work (name -> count), exported on ``/metrics`` as
        ``tandem_<name>_total``; the default has none."""
        return {}

    def special_tokens(self) -> dict[str, str | None]:
        """Texts of the model's special tokens; the default knows none."""
        return {"bos_token": None, "eos_token": None, "pad_token": None}

    @abc.abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @abc.abstractmethod
    def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GeneratedToken]:
        """Yields generated tokens until an end-of-generation token (yielded last, marked ``end``, without
        text) or ``params.max_tokens``.

        Closing the iterator early must cancel the work and free the slot. ``cancel``, when given,
        may be set from another thread: the backend then drops the request wherever it is (queued,
        prefilling, decoding) and ends the iterator soon, without waiting for another token.
        """

    @abc.abstractmethod
    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        """Log-probability of each target token given the prompt and the targets before it."""

    @abc.abstractmethod
    def detokenize(self, token_ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (backends with byte-level pieces override this)."""
        return self.detokenize([token_id]).encode("utf-8")

    def prompt_logprobs(
        self, prompt_ids: list[int], target_ids: list[int], top: int = 0, adapter: str | None = None
    ) -> list[GeneratedToken]:
        """Scores ``target_ids``; backends that can list the ``top`` alternatives (or serve adapters) override this."""
        if adapter is not None:
            raise EngineError(f"the {self.info.backend} backend cannot score with adapters")
        if top:
            raise EngineError(f"the {self.info.backend} backend cannot list top log-probabilities of prompt tokens")
        scores = self.score_tokens(prompt_ids, target_ids)
        return [GeneratedToken(t, "", logprob) for t, logprob in zip(target_ids, scores, strict=True)]

    def close(self) -> None:  # noqa: B027 - optional for backends with nothing to free
        """Frees resources; the default has nothing to free."""

    # ---- LoRA adapters (backends that serve them override the first two) -------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter folder ``path`` as ``name``; requests pick it with ``SamplingParams.adapter``."""
        raise EngineError(f"the {self.info.backend} backend cannot serve adapters (planned)")

    def load_adapters(self, adapters: Mapping[str, str | Path] | None) -> None:
        """Loads each ``{name: path}``; if one fails the engine is closed (no half-loaded server) and the error raised."""
        try:
            for name, path in (adapters or {}).items():
                self.load_adapter(name, str(path))
        except BaseException:
            self.close()
            raise

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters loaded so far."""
        return []

    def adapter_view(self, name: str, parent: str | None = None) -> AdapterView:
        """The loaded adapter ``name`` as an :class:`Engine` of its own (``parent``: the base's served name)."""
        if name not in self.loaded_adapters():
            loaded = ", ".join(self.loaded_adapters()) or "none"
            raise EngineError(f"adapter {name!r} is not loaded (loaded: {loaded})")
        return AdapterView(self, name, parent or self.info.model_id)

    # ---- shared behaviour --------------------------------------------------------------------
    def chat(
        self, messages: Sequence[Message], params: SamplingParams, tools: Sequence[dict[str, Any]] | None = None
    ) -> Iterator[Delta]:
        ids, prompt = self.chat_prompt(messages, tools, constrained=params.constraint is not None)
        return self._stream(ids, params, starts_in_reasoning=prompt_opens_reasoning(prompt))

    def chat_prompt(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None, constrained: bool = False
    ) -> tuple[list[int], str]:
        """The token ids and text :meth:`chat` prefills for ``messages`` (what usage counts as prompt tokens)."""
        prompt = self.render_chat(validate_messages(messages), tools=tools)
        if constrained and prompt_opens_reasoning(prompt):
            # A grammar holds from the first token, so a reasoning model answers without its <think>
            # block rather than having the grammar swallow it: close the block in the prompt.
            prompt += f"{THINK_CLOSE}\n\n"
        self.check_prompt_chars(len(prompt))
        return self.tokenize(prompt, add_special_tokens=False), prompt

    def generate(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Delta]:
        if isinstance(prompt, list):
            ids = self.check_token_ids(prompt)
        elif isinstance(prompt, str) and prompt:
            self.check_prompt_chars(len(prompt))
            ids = self.tokenize(prompt, add_special_tokens=True)
        else:
            raise EngineError("prompt must be a non-empty string or a non-empty list of token ids")
        return self._stream(ids, params, starts_in_reasoning=False, split_reasoning=False)

    def check_token_ids(self, ids: list[int]) -> list[int]:
        """``ids`` if they are all token ids of this model's vocabulary; an EngineError naming the first bad one."""
        vocab = self.vocab_size()
        if not ids:
            raise EngineError("prompt must not be an empty list of token ids")
        for index, token in enumerate(ids):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise EngineError(f"prompt[{index}] = {token!r} is not a token id (the vocabulary has {vocab})")
        return list(ids)

    def vocab_size(self) -> int:
        """Number of token ids the model knows (backends override; the default accepts any id)."""
        return 1 << 31

    def check_prompt_chars(self, chars: int) -> None:
        """Refuses a prompt that cannot fit the context window before paying to tokenize it: no token
        covers more than :meth:`longest_token_chars` characters, so a longer text surely overflows."""
        limit = self.info.context_length * self.longest_token_chars()
        if chars > limit:
            raise ContextLengthError(
                f"prompt is {chars} characters but the model's context window is {self.info.context_length} "
                f"tokens, which hold at most {limit} characters of this model's tokens"
            )

    def longest_token_chars(self) -> int:
        """An upper bound on the characters one token stands for, from the vocabulary (measured once)."""
        if self._longest_token is None:
            vocab = self.vocab_size()
            self._longest_token = max(map(len, self.vocabulary_pieces())) if vocab < 1 << 20 else 1 << 12
        return self._longest_token

    def vocabulary_pieces(self) -> Iterator[str | bytes]:
        """Every token's text or bytes (their length bounds the characters; backends may override)."""
        return (self.token_bytes(token) for token in range(self.vocab_size()))

    def token_logprobs(
        self, messages: Sequence[Message], response: str, adapter: str | None = None
    ) -> list[tuple[str, float]]:
        """Per-token log-probabilities of ``response`` after ``messages`` (with the named adapter on, if any)."""
        prompt = self.render_chat(validate_messages(messages))
        prompt_ids = self.tokenize(prompt, add_special_tokens=False)
        full_ids = self.tokenize(prompt + response, add_special_tokens=False)
        # Tokenizing prompt+response together keeps merges across the boundary as the model saw them.
        split = common_prefix_len(prompt_ids, full_ids)
        target = full_ids[split:]
        if not target:
            return []
        self.check_context(len(full_ids), 0)
        if adapter is None:
            logprobs = self.score_tokens(full_ids[:split], target)
        else:
            logprobs = [t.logprob for t in self.prompt_logprobs(full_ids[:split], target, adapter=adapter)]
        return [(self.detokenize([tid]), lp) for tid, lp in zip(target, logprobs, strict=True)]

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        limit = self.info.context_length
        if prompt_len >= limit:
            raise ContextLengthError(f"prompt is {prompt_len} tokens but the model's context window is {limit} tokens")
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
        if params.max_tokens is None:  # "as many as fit"
            self.check_context(len(prompt_ids), 0)
            params = dataclasses.replace(params, max_tokens=self.open_ended_budget(len(prompt_ids)))
        self.check_context(len(prompt_ids), params.max_tokens)
        self.check_params(params)
        cancel = threading.Event()
        return CancellableStream(
            self._stream_gen(prompt_ids, params, starts_in_reasoning, split_reasoning, cancel), cancel
        )

    def open_ended_budget(self, prompt_len: int) -> int:
        """Most tokens a request without ``max_tokens`` may generate: what the context window leaves
        (backends that share one KV cache between requests give each a fair share instead)."""
        return self.info.context_length - prompt_len

    def check_params(self, params: SamplingParams) -> None:
        """Raises EngineError naming the first optional setting this backend does not list in ``features``."""
        for name in params.features_used():
            if name not in self.features:
                raise EngineError(f"{name} is not supported by the {self.info.backend} backend")

    def token_logprob(self, token: GeneratedToken) -> TokenLogprob:
        """The OpenAI-shaped log-probability record of a generated (or scored) token."""
        assert token.logprob is not None
        raw = self.token_bytes(token.token_id)
        top = [self._alternative(tid, lp) for tid, lp in token.top_logprobs]
        return TokenLogprob(raw.decode("utf-8", "replace"), raw, token.logprob, top)

    def _alternative(self, token_id: int, logprob: float) -> TokenLogprob:
        raw = self.token_bytes(token_id)
        return TokenLogprob(raw.decode("utf-8", "replace"), raw, logprob)

    def _stream_gen(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        starts_in_reasoning: bool,
        split_reasoning: bool,
        cancel: threading.Event,
    ) -> Iterator[Delta]:
        stops = StopStringFilter(params.stop)
        splitter = ReasoningSplitter(starts_in_reasoning) if split_reasoning else None
        usage = Usage(prompt_tokens=len(prompt_ids))
        finish: str = "length"
        ended = False  # on an end-of-generation token: "stop", whatever max_tokens
        tokens = self.stream_tokens(prompt_ids, params, cancel)
        try:
            for token in tokens:
                # The end token is in the log-probabilities (lm-eval reads it there) but not in usage,
                # which counts the tokens of the answer (vLLM counts it; our CLI and UI never did).
                ended = token.end
                usage.completion_tokens += not ended
                text = stops.feed(token.text)
                delta = self._split(splitter, text)
                if token.logprob is not None:
                    delta.logprobs.append(self.token_logprob(token))
                if delta.text or delta.reasoning or delta.logprobs:
                    yield delta
                if stops.stopped:
                    finish = "stop"
                    break
            else:
                if cancel.is_set():  # the scheduler ended the stream because it was cancelled
                    finish = "cancelled"
                else:
                    finish = "length" if usage.completion_tokens >= params.max_tokens and not ended else "stop"
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


class PromptLogprobScoring:
    """``score_tokens`` for a backend whose ``prompt_logprobs`` scores by itself: its records' log-probs."""

    prompt_logprobs: Callable[[list[int], list[int]], list[GeneratedToken]]

    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        """Log-probability of each target token given the prompt and the targets before it."""
        return [token.logprob for token in self.prompt_logprobs(prompt_ids, target_ids)]  # type: ignore[misc]


def check_embed_inputs(token_lists: list[list[int]], max_tokens: int | None = None) -> None:
    """Refuses an empty token list, or one over ``max_tokens`` tokens (when given), naming its index."""
    for index, ids in enumerate(token_lists):
        if not ids:
            raise EngineError(f"input {index} is empty: there is nothing to embed")
        if max_tokens is not None and len(ids) > max_tokens:
            raise EngineError(f"input {index} has {len(ids)} tokens; embeddings take at most {max_tokens}")


class AdapterView(PromptLogprobScoring):
    """A loaded LoRA adapter served as a model of its own, on its base engine's weights.

    Generation gets ``params.adapter`` set and scoring runs with the adapter on; the tokenizer and
    template are the base's. Closing it does nothing: the base engine owns the model and frees it.
    """

    def __init__(self, base: BaseEngine, name: str, parent: str) -> None:
        self.base, self.name, self.parent = base, name, parent
        self.info = dataclasses.replace(base.info, model_id=name)

    def chat(
        self, messages: Sequence[Message], params: SamplingParams, tools: Sequence[dict[str, Any]] | None = None
    ) -> Iterator[Delta]:
        """The base's chat with this adapter on."""
        return self.base.chat(messages, dataclasses.replace(params, adapter=self.name), tools)

    def generate(self, prompt: str | list[int], params: SamplingParams) -> Iterator[Delta]:
        """The base's raw completion with this adapter on."""
        return self.base.generate(prompt, dataclasses.replace(params, adapter=self.name))

    def token_logprobs(self, messages: Sequence[Message], response: str) -> list[tuple[str, float]]:
        """Log-probabilities of ``response`` under the adapted model."""
        return self.base.token_logprobs(messages, response, adapter=self.name)

    def prompt_logprobs(self, prompt_ids: list[int], target_ids: list[int], top: int = 0) -> list[GeneratedToken]:
        """Scores ``target_ids`` with this adapter on."""
        return self.base.prompt_logprobs(prompt_ids, target_ids, top, adapter=self.name)

    def counters(self) -> dict[str, int]:
        """None of its own: the base engine counts the work of all its adapters."""
        return {}

    def close(self) -> None:
        """Nothing to free: the base engine owns the model (close that one)."""

    def __getattr__(self, name: str) -> Any:
        # Tokenizer, template, token records, features: all the base's.
        return getattr(self.base, name)


def collect(stream: Iterator[Delta]) -> Completion:
    """Drains a stream into one :class:`Completion`."""
    text, reasoning, logprobs = [], [], []
    finish, usage = "stop", Usage()
    for delta in stream:
        text.append(delta.text)
        reasoning.append(delta.reasoning)
        logprobs.extend(delta.logprobs)
        if delta.finish_reason:
            finish = delta.finish_reason
        if delta.usage:
            usage = delta.usage
    return Completion("".join(text), "".join(reasoning), finish, usage, logprobs)  # type: ignore[arg-type]
