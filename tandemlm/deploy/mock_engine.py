"""A deterministic engine for fast tests of the server, CLI and UI.

It is registered through the real registry (as backend ``mock``), tokenizes on characters and
"generates" by echoing a scripted reply, so surfaces can be tested without loading a model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tandemlm.deploy.engine import BaseEngine
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.types import EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message

EOS_ID = 0
REPLY_LOGPROB = math.log(0.9)  # each character of the scripted reply
END_LOGPROB = math.log(0.5)  # the end-of-generation token right after it


class MockEngine(BaseEngine):
    """Replies ``reply`` (default: the reversed last user message) one character per token.

    Each generated token has log-probability log(0.9) when log-probabilities are asked for; a reply
    that fits ``max_tokens`` ends with the end-of-generation token ``EOS_ID`` (log-probability log(0.5)).

    With ``fail`` set, generation raises ``EngineError(fail)`` after its first token, as a backend
    that breaks mid-generation (after the request was validated) would. ``linger`` (seconds) keeps a
    request stopped before its end inside the engine that much longer, as a backend slow to let go
    of a cancelled request. ``inside`` counts the requests the engine holds now, ``most_inside`` the
    most it ever held at once. ``constrained`` claims ``response_format`` (and so forced tool calls):
    the scripted reply stands in for grammar-constrained output.
    """

    def __init__(
        self,
        model_id: str = "mock",
        reply: str | None = None,
        delay: float = 0.0,
        context_length: int = 2048,
        fail: str | None = None,
        linger: float = 0.0,
        constrained: bool = False,
    ) -> None:
        self.info = EngineInfo(backend="mock", model_id=model_id, context_length=context_length)
        self.features = frozenset({"logprobs", "response_format"} if constrained else {"logprobs"})
        self.reply = reply
        self.delay = delay
        self.fail = fail
        self.linger = linger
        self.cancelled = 0
        self.inside = self.most_inside = 0
        self._count_lock = threading.Lock()

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
        self._count(+1)
        try:
            for char in reply[: params.max_tokens]:
                if self.delay:  # "decoding": a cancel ends the wait at once, as a real scheduler would
                    (cancel or threading.Event()).wait(self.delay)
                if cancel is not None and cancel.is_set():
                    return
                emitted += 1
                yield GeneratedToken(ord(char), char, REPLY_LOGPROB if params.logprobs is not None else None)
                if self.fail is not None:
                    raise EngineError(self.fail)
            if emitted < params.max_tokens:
                yield GeneratedToken(EOS_ID, "", END_LOGPROB if params.logprobs is not None else None, end=True)
        finally:
            if emitted < min(len(reply), params.max_tokens):
                self.cancelled += 1
                time.sleep(self.linger)  # a backend slow to let go of a stopped request
            self._count(-1)

    def _count(self, step: int) -> None:
        with self._count_lock:
            self.inside += step
            self.most_inside = max(self.most_inside, self.inside)

    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        # Characters of the scripted reply are likely, and its end after it; anything else less so.
        script = [ord(c) for c in self._reply_for(self.detokenize(prompt_ids))]
        likely = [REPLY_LOGPROB] * len(script) + [END_LOGPROB]
        script.append(EOS_ID)
        return [likely[i] if i < len(script) and t == script[i] else math.log(0.01) for i, t in enumerate(target_ids)]


def _available() -> str | None:
    return None


@register_backend("mock", description="scripted engine for tests (no model)", available=_available, hidden=True)
def load_mock(source: object = None, **options: object) -> MockEngine:
    return MockEngine(**options)  # type: ignore[arg-type]
