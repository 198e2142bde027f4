"""Serving logic: admission (bounded concurrency with a queue) and engine streams bridged to asyncio.

It only sees the :class:`~tandemlm.deploy.engine.Engine` protocol. Each request's engine stream
runs in a worker thread; the engine batches concurrent streams itself. A client that goes away
closes its stream, which cancels the generation and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

from tandemlm.deploy.types import Delta

_DONE = object()


class ServerBusy(Exception):
    """Every slot is taken and the wait queue is full."""


class Admission:
    """At most ``max_concurrency`` generations run at once; up to ``max_queue`` more wait their turn.

    A request :meth:`claim`s its place before its response starts, so the answer is decided up
    front: admitted, queued, or :class:`ServerBusy` (a 503), never a 200 that breaks off later.
    ``max_queue=0`` means no waiting room: a request is admitted while a slot is free.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 (no waiting room) or more, got {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.running = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def claim(self) -> Ticket:
        """A running slot or a place in the queue, taken at once (no await); ServerBusy if neither is free."""
        if self.running < self.max_concurrency and not self._queue:
            self.running += 1
            return Ticket(self, None)
        if len(self._queue) >= self.max_queue:
            raise ServerBusy(f"server busy: {self.running} running and {self.waiting} queued requests; retry later")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        return Ticket(self, turn)

    def _free_slot(self) -> None:
        # Hand the slot straight to the first request still waiting, so no newcomer can jump the queue.
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.running -= 1

    def _leave_queue(self, turn: asyncio.Future[None]) -> None:
        turn.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(turn)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Claims, waits for its turn, and releases on exit (for callers that need no early decision)."""
        ticket = self.claim()
        try:
            await ticket.admitted()
            yield
        finally:
            ticket.release()


class Ticket:
    """One request's claim on :class:`Admission`: a slot, or a queue place until :meth:`admitted`."""

    def __init__(self, admission: Admission, turn: asyncio.Future[None] | None) -> None:
        self._admission = admission
        self._turn = turn
        self._released = False

    async def admitted(self) -> None:
        """Waits until the request holds a slot (at once if it got one when claimed)."""
        if self._turn is not None:
            await self._turn

    def release(self) -> None:
        """Frees the slot or the queue place; safe to call more than once, and before :meth:`admitted`."""
        if self._released:
            return
        self._released = True
        turn = self._turn
        if turn is None or (turn.done() and not turn.cancelled()):
            self._admission._free_slot()
        else:
            self._admission._leave_queue(turn)


async def iterate_in_thread(stream: Iterator[Delta]) -> AsyncIterator[Delta]:
    """Runs a blocking engine stream in a worker thread and yields its deltas on the event loop.

    If the consumer stops early (client disconnect, cancellation), the stream is cancelled in the
    engine wherever the request is (queued, prefilling, decoding), and this returns only once the
    engine has let go of it, so the caller's slot is freed after the engine's, never before.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    finished = loop.create_future()

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
            loop.call_soon_threadsafe(_settle, finished)

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
        cancel = getattr(stream, "cancel", None)
        if cancel is not None and not finished.done():
            cancel()  # reaches a request the engine has not started or is still prefilling
        # Shielded: Starlette cancels a disconnected response's task group, and anyio re-delivers that
        # cancel at every await, so an unshielded wait would free the slot while the engine still
        # holds it. Unbounded: freeing the slot earlier would let the engine hold more requests than
        # its slots; a backend that is slow to let go is logged instead.
        with anyio.CancelScope(shield=True):
            await _engine_let_go(finished)


CANCEL_WAIT_S = 30.0
"""How long a stopped stream waits for its engine to drop the request before a warning is logged
(the slot stays taken until the engine lets go, however long that is)."""

logger = logging.getLogger(__name__)


async def _engine_let_go(finished: asyncio.Future[None]) -> None:
    # asyncio.wait, not a timeout around the future: a timeout would cancel the future itself.
    done, _ = await asyncio.wait({finished}, timeout=CANCEL_WAIT_S)
    if not done:
        logger.warning(
            "a cancelled request is still in the engine after %.0f s; its slot stays taken until the engine lets go",
            CANCEL_WAIT_S,
        )
        await finished


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
