"""A multi-turn comparison: two conversations that share the user's turns, and the one-run-at-a-time guard.

Each side keeps its own conversation: the user's turns are the same on both, the assistant turns
are that side's own replies, so a follow-up reaches each engine with the history that side
actually had. The sides (which slot answers left and right) are fixed when the conversation
starts, so a blind battle keeps the same hidden models for all its turns. Pure state, no Gradio.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tandemlm.models.chat_template import Message
from tandemlm.ui.chat_tab import Turn, chat_display, engine_messages
from tandemlm.ui.compare.arena import ALIASES, assign_sides

SIDE_KEYS = ("left", "right")
BUSY = "A comparison is already running: wait for it or press Stop."


@dataclass(frozen=True)
class Conversation:
    """The turns so far on each side, and which slot answers on which side for the whole conversation.

    Frozen: a turn makes a new Conversation (:meth:`extend`), so a Gradio state holding the old one
    never sees a half-finished turn.
    """

    roles: Mapping[str, str]  # side -> slot role ("policy" or "reference")
    blind: bool = False
    turns: Mapping[str, tuple[Turn, ...]] = field(default_factory=lambda: {key: () for key in SIDE_KEYS})

    @classmethod
    def start(cls, blind: bool = False, rng: random.Random | None = None) -> Conversation:
        """A new, empty conversation; ``blind`` draws the sides (``rng``) once for all its turns."""
        return cls(assign_sides(blind, rng), blind)

    def alias(self, side: str) -> str:
        """The name a blind battle shows for ``side`` (empty when not blind)."""
        return ALIASES[side] if self.blind else ""

    @property
    def user_turns(self) -> int:
        """How many user messages the conversation has had."""
        return sum(1 for turn in self.turns["left"] if turn["role"] == "user")

    def messages(self, side: str, system: str | None, user: str) -> list[Message]:
        """What ``side``'s engine is sent for the new ``user`` message: system prompt, its own history, the message."""
        return [*engine_messages(self.turns[side], system), {"role": "user", "content": user}]

    def extend(self, user: str, replies: Mapping[str, Turn]) -> Conversation:
        """This conversation with one more turn: ``user`` on both sides, then each side's own reply."""
        turns = {key: (*self.turns[key], {"role": "user", "content": user}, dict(replies[key])) for key in SIDE_KEYS}
        return Conversation(self.roles, self.blind, turns)

    def display(self, side: str, user: str = "", reply: Turn | None = None, streaming: bool = False) -> list[dict[str, Any]]:
        """Chatbot messages for ``side``: its history, then the pending ``user`` message and ``reply`` if given."""
        pending: list[Turn] = [{"role": "user", "content": user}] if user else []
        if reply is not None and (reply.get("content") or reply.get("reasoning")):
            pending.append(reply)
        return chat_display([*self.turns[side], *pending], streaming=streaming)


class RunGuard:
    """One comparison at a time per browser session: a second Compare while one runs is refused, not queued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def begin(self) -> bool:
        """Takes the guard; False when a comparison of this session is already running."""
        return self._lock.acquire(blocking=False)

    def end(self) -> None:
        """Frees the guard (the comparison ended, was stopped or failed)."""
        if self._lock.locked():
            self._lock.release()

    @property
    def running(self) -> bool:
        """Whether a comparison holds the guard now."""
        return self._lock.locked()

    def __deepcopy__(self, memo: dict[int, Any]) -> RunGuard:
        # gr.State deep-copies its initial value for each browser session: each gets its own guard.
        return RunGuard()
