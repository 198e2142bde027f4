"""The pieces every backend's scheduler thread shares: its request queue and close protocol, and
the token queue a caller drains while the scheduler fills it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from tandemlm.deploy.types import GeneratedToken
from tandemlm.errors import EngineError

T = TypeVar("T")


class WorkQueue(Generic[T]):
    """Requests handed to a backend's scheduler thread, with the close protocol every backend shares:
    nothing is accepted once closing starts, closing waits for the thread (which checks ``running``
    between steps), then hands back the requests it never took, for the backend to fail."""

    def __init__(self, loop: Callable[[], None], name: str) -> None:
        self.items: queue.Queue[T | None] = queue.Queue()
        self.running = True
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=loop, name=name, daemon=True)

    def start(self) -> None:
        """Starts the thread (once the owner can answer its loop: after the queue is assigned)."""
        self._thread.start()

    def submit(self, item: T) -> None:
        # Under the lock so no request can slip in after stop() has drained the queue.
        with self._lock:
            if not self.running:
                raise EngineError("engine closed")
            self.items.put(item)

    def stop(self) -> list[T] | None:
        """Stops the thread; the requests it never took, or None when it was stopped already."""
        with self._lock:
            if not self.running:
                return None
            self.running = False
            self.items.put(None)  # wakes a scheduler blocked waiting for work
        self._thread.join()
        left: list[T] = []
        while True:
            try:
                item = self.items.get_nowait()
            except queue.Empty:
                return left
            if item is not None:
                left.append(item)


class CancellableStream(Generic[T]):
    """An engine stream another thread can cancel while the consuming thread is blocked in it.

    A generator cannot be closed from a second thread while it runs, and a request still queued or
    prefilling yields nothing the consumer could react to. ``cancel()`` sets the event the backend
    watches for this request, so its scheduler drops the request wherever it is and ends the stream.
    """

    def __init__(self, items: Iterator[T], cancel: threading.Event) -> None:
        self._items = items
        self.cancelled = cancel

    def __iter__(self) -> CancellableStream[T]:
        return self

    def __next__(self) -> T:
        return next(self._items)

    def cancel(self) -> None:
        """Thread-safe: asks the backend to drop the request and end this stream soon."""
        self.cancelled.set()

    def close(self) -> None:
        """Closes the stream from the thread consuming it (cancels the request if still running)."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


def drain_tokens(out: queue.Queue[Any], cancelled: threading.Event) -> Iterator[GeneratedToken]:
    """Yields tokens a scheduler thread puts on ``out`` until ``None``; an exception put there is raised.

    Closing the iterator early sets ``cancelled``, which tells the scheduler to drop the request; an
    end the scheduler reported leaves it alone, so a set event means the request was cancelled.
    """
    ended = False  # by the scheduler (done, failed or cancelled), not by the caller closing early
    try:
        while True:
            item = out.get()
            if item is None or isinstance(item, Exception):
                ended = True
                if item is None:
                    return
                raise item
            yield item
    finally:
        if not ended:
            cancelled.set()


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading items ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
