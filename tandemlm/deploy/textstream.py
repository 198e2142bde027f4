"""Streaming text filters shared by every backend: stop strings and ``<think>`` reasoning.

Both work on text pieces as they arrive and hold back only the few characters that could still
turn out to be the start of a stop string or a tag, so streaming stays smooth.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _partial_suffix_len(text: str, needle: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``needle``."""
    for size in range(min(len(text), len(needle) - 1), 0, -1):
        if needle.startswith(text[-size:]):
            return size
    return 0


class StopStringFilter:
    """Cuts the stream at the first stop string; the stop string itself is not emitted."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Returns the text that is safe to emit now; sets ``stopped`` once a stop string is seen."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(index for index, _ in hits)
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max(_partial_suffix_len(self.pending, s) for s in self.stops)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class ReasoningSplitter:
    """Splits DeepSeek-R1 style output into reasoning (inside ``<think>…</think>``) and answer.

    R1 chat templates end the generation prompt with ``<think>\\n``, so the model's output starts
    inside the reasoning block without an opening tag: pass ``starts_in_reasoning=True`` then.
    """

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self.in_reasoning = starts_in_reasoning
        self.pending = ""
        self.strip_newlines = False  # the answer after </think> conventionally starts with blank lines

    def feed(self, piece: str) -> tuple[str, str]:
        """Returns ``(answer_text, reasoning_text)`` safe to emit now."""
        self.pending += piece
        answer, reasoning = [], []
        while self.pending:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            index = self.pending.find(tag)
            if index >= 0:
                before = self.pending[:index]
                self.pending = self.pending[index + len(tag) :]
                (reasoning if self.in_reasoning else answer).append(before)
                self.in_reasoning = not self.in_reasoning
                self.strip_newlines = not self.in_reasoning
                continue
            hold = _partial_suffix_len(self.pending, tag)
            emit = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(emit) :]
            (reasoning if self.in_reasoning else answer).append(emit)
            break
        text = "".join(answer)
        if self.strip_newlines and text:
            text = text.lstrip("\n")
            self.strip_newlines = not text
        return text, "".join(reasoning)

    def flush(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        return ("", rest) if self.in_reasoning else (rest, "")


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt leaves the model inside an open ``<think>`` block."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)
