"""A deterministic engine for fast tests of the server, CLI and UI.

It is registered through the real registry (as backend ``mock``), tokenizes on characters and
"generates" by echoing a scripted reply, so surfaces can be tested without loading a model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from tandemlm.deploy.engine import BaseEngine
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.types import EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message

EOS_ID = 0


class MockEngine(BaseEngine):
    """Replies ``reply`` (default: the reversed last user message) one character per token.

    Each generated token has log-probability log(0.9) when log-probabilities are asked for.

    With ``fail`` set, generation raises ``EngineError(fail)`` after its first token, as a backend
    that breaks mid-generation (after the request was validated) would.
    """

    def __init__(
        self,
        model_id: str = "mock",
        reply: str | None = None,
        delay: float = 0.0,
        context_length: int = 2048,
        fail: str | None = None,
    ) -> None:
        self.info = EngineInfo(backend="mock", model_id=model_id, context_length=context_length)
        self.features = frozenset({"logprobs"})
        self.reply = reply
        self.delay = delay
        self.fail = fail
        self.cancelled = 0

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        text = "".join(f"<|tools|>{len(tools)}\n" for _ in [tools] if tools)
        text += "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def longest_token_chars(self) -> int:
        return 1  # one character per token

    def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids if t > 1)

    def _reply_for(self, prompt: str) -> str:
        if self.reply is not None:
            return self.reply
        last = prompt.rsplit("<|user|>", 1)[-1].split("\n", 1)[0]
        return last[::-1] or "?"

    def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GeneratedToken]:
        reply = self._reply_for(self.detokenize(prompt_ids))
        emitted = 0
        try:
            for char in reply[: params.max_tokens]:
                if self.delay:  # "decoding": a cancel ends the wait at once, as a real scheduler would
                    (cancel or threading.Event()).wait(self.delay)
                if cancel is not None and cancel.is_set():
                    return
                emitted += 1
                logprob = math.log(0.9) if params.logprobs is not None else None
                yield GeneratedToken(ord(char), char, logprob)
                if self.fail is not None:
                    raise EngineError(self.fail)
        finally:
            if emitted < min(len(reply), params.max_tokens):
                self.cancelled += 1

    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        # Characters of the scripted reply are likely; anything else less so.
        reply = self._reply_for(self.detokenize(prompt_ids))
        return [
            math.log(0.9) if i < len(reply) and chr(t) == reply[i] else math.log(0.01) for i, t in enumerate(target_ids)
        ]


def _available() -> str | None:
    return None


@register_backend("mock", description="scripted engine for tests (no model)", available=_available, hidden=True)
def load_mock(source: object = None, **options: object) -> MockEngine:
    return MockEngine(**options)  # type: ignore[arg-type]
