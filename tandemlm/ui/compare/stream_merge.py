"""Drains several token streams at the same time, one thread each, into one ordered feed.

The engines batch concurrent requests internally, so two sides of a comparison decode together;
this only has to pull from both without one waiting on the other.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")
DONE = object()
"""Sent once per stream when it ends (after its last item or its error)."""


def merge_streams(streams: Mapping[str, Iterator[T]]) -> Iterator[list[tuple[str, object]]]:
    """Yields batches of ``(key, item)``: an item, an Exception the stream raised, or :data:`DONE`.

    Each batch holds everything that arrived since the last one, so a slow consumer (the browser)
    gets fewer, larger updates. Closing this generator stops the streams and frees their slots.
    """
    feed: queue.Queue[tuple[str, object]] = queue.Queue()
    stop = threading.Event()
    threads = [threading.Thread(target=_pump, args=(k, s, feed, stop), daemon=True) for k, s in streams.items()]
    for thread in threads:
        thread.start()
    remaining = len(threads)
    try:
        while remaining:
            batch = [feed.get()]
            while True:
                try:
                    batch.append(feed.get_nowait())
                except queue.Empty:
                    break
            remaining -= sum(1 for _, item in batch if item is DONE)
            yield batch
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def _pump(key: str, stream: Iterator[T], feed: queue.Queue[tuple[str, object]], stop: threading.Event) -> None:
    try:
        for item in stream:
            feed.put((key, item))
            if stop.is_set():
                break
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which shows it on that side
        feed.put((key, exc))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # cancels the engine request when stopped early
        feed.put((key, DONE))
