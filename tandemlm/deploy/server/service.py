"""Serving logic: admission (bounded concurrency with a queue) and engine streams bridged to asyncio.

It only sees the :class:`~tandemlm.deploy.engine.Engine` protocol. Each request's engine stream
runs in a worker thread; the engine batches concurrent streams itself. A client that goes away
closes its stream, which cancels the generation and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.types import Delta, Usage

_DONE = object()


class ServerBusy(Exception):
    """The wait queue is full."""


class Admission:
    """At most ``max_concurrency`` generations run at once; up to ``max_queue`` more wait their turn."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrency)
        self.waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise ServerBusy(f"server busy: {self.running} running and {self.waiting} queued requests")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


async def iterate_in_thread(stream: Iterator[Delta]) -> AsyncIterator[Delta]:
    """Runs a blocking engine stream in a worker thread and yields its deltas on the event loop.

    If the consumer stops early (client disconnect, cancellation), the worker closes the engine
    stream, which cancels the generation inside the engine.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            try:
                for delta in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                    if stop.is_set():
                        break
            finally:
                close = getattr(stream, "close", None)
                if close:
                    close()
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop to raise there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    worker = threading.Thread(target=work, name="tandem-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ChatChunks:
    """Builds ``chat.completion`` and ``chat.completion.chunk`` bodies for one response."""

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.model = model
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def role_chunk(self) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}

    def chunk(self, delta: Delta) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if delta.text:
            body["content"] = delta.text
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        return {**self._base("chat.completion.chunk"), "choices": [{"index": 0, "delta": body, "finish_reason": delta.finish_reason}]}

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def full(self, text: str, reasoning: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        return {
            **self._base("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage_json(usage),
        }


class TextChunks(ChatChunks):
    """Builds ``text_completion`` bodies (streamed and whole)."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = new_id("cmpl")

    def chunk(self, delta: Delta) -> dict[str, Any]:
        return {**self._base("text_completion"), "choices": [{"index": 0, "text": delta.text, "finish_reason": delta.finish_reason}]}

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        return {**self._base("text_completion"), "choices": [], "usage": usage_json(usage)}

    def full(self, text: str, reasoning: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        return {
            **self._base("text_completion"),
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}],
            "usage": usage_json(usage),
        }


def engine_model_id(engine: Engine) -> str:
    return engine.info.model_id
