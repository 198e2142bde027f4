"""Runs the choices of one request (``n`` of them, for each prompt) side by side as engine streams.

Each choice holds an admission slot of its own, claimed all at once before the response starts,
so a request either runs whole or gets its 503 up front. Their deltas are merged in arrival order,
tagged with the choice's index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from tandemlm.deploy.server.service import Admission, Ticket, iterate_in_thread
from tandemlm.deploy.types import Delta


@dataclass
class Choice:
    """One engine stream answering one choice of a request."""

    index: int
    stream: Iterator[Delta]


def claim_slots(admission: Admission, count: int) -> list[Ticket]:
    """``count`` admission tickets, all or none (ServerBusy releases those already taken)."""
    if count > admission.max_concurrency:
        raise ValueError(
            f"this request needs {count} generations at once but the server runs at most "
            f"{admission.max_concurrency} (--n-parallel); lower n or send fewer prompts"
        )
    tickets: list[Ticket] = []
    try:
        for _ in range(count):
            tickets.append(admission.claim())
    except BaseException:
        release_all(tickets)
        raise
    return tickets


def release_all(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket.release()


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of every choice as they come, as ``(index, delta)``; the first failure is raised.

    Leaving early (client gone) stops every choice's stream, which cancels it in the engine.
    """
    if len(choices) == 1:  # the common case, without the extra hop
        async for delta in iterate_in_thread(choices[0].stream):
            yield choices[0].index, delta
        return
    queue: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for delta in iterate_in_thread(choice.stream):
                await queue.put((choice.index, delta))
        except Exception as exc:  # noqa: BLE001 - handed over to be raised by the consumer
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
