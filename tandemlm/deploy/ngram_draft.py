"""N-gram drafting for speculative decoding: guess the next tokens from what followed the same n-gram before.

Text that copies (a JSON object rewritten, code edited in place, a quote) repeats long runs of the
prompt or of itself. When the last ``n`` tokens of a sequence occurred earlier, the tokens that
followed that occurrence are a cheap guess at what comes next; the scheduler has the model check the
guess in one batched decode and keeps what it would have produced anyway. Like llama-server's
``ngram-simple`` (``common/ngram-map.cpp``), the most recent earlier occurrence wins; unlike it, the
longest n-gram that matches (from ``max_n`` down to ``min_n``) is looked up in an index kept up to date
token by token, so a step costs O(max_n - min_n + k) whatever the sequence's length, not a rescan.
Checking a draft is not free on a CPU (each drafted token is one more row through the model), so the
draft length adapts to the sequence: it starts at 4, grows by 2 after a draft kept whole (up to 12)
and shrinks by 1 after a miss (down to 2) (:meth:`NgramDrafter.record`; replaying the built-in model's
answers on bench/speculative.py's prompts, this checked as few rows per kept token as the best fixed
length, 4, and it lengthens on long verbatim copies).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

DEFAULT_MAX_N = 4  # the longest n-gram looked up
DEFAULT_MIN_N = 2  # the shortest (one token matches too often to be a useful guess)
DEFAULT_DRAFT_TOKENS = 12  # tokens drafted per step at most
FIRST_DRAFT_TOKENS = 4  # a sequence's first draft length, before record() adapts it
SHORTEST_DRAFT = 2  # the adapted length never falls below this


class NgramDrafter:
    """One sequence's tokens (prompt, then generated) and an index of where each n-gram last ended."""

    def __init__(self, max_n: int = DEFAULT_MAX_N, min_n: int = DEFAULT_MIN_N) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list[int] = []
        # n-gram -> the position right after its most recent occurrence, for every n-gram ending before
        # the last token (the sequence's own suffix is never its own match).
        self._after: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in _after
        self.limit = FIRST_DRAFT_TOKENS  # the next draft's length at most (record() adapts it)

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` (and :attr:`limit`) tokens that followed the most recent earlier occurrence of the
        longest matching suffix."""
        tokens = self.tokens
        length = len(tokens)
        self._index_until(length - 1)
        k = min(k, self.limit)
        if k <= 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = self._after.get(tuple(tokens[length - n :]))
            if start is not None:
                return _continuation(tokens, start, k)
        return []

    def record(self, drafted: int, kept: int, most: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Adapts :attr:`limit` to how much of the last draft (``drafted`` tokens) was ``kept``."""
        self.limit = min(most, self.limit + 2) if kept >= drafted else max(SHORTEST_DRAFT, self.limit - 1)

    def _index_until(self, end: int) -> None:
        """Indexes every n-gram that ends (exclusive) at a position up to ``end``."""
        tokens, after = self.tokens, self._after
        for stop in range(self._indexed + 1, end + 1):
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                after[tuple(tokens[stop - n : stop])] = stop
        self._indexed = max(self._indexed, end)


def _continuation(tokens: Sequence[int], start: int, k: int) -> list[int]:
    """``tokens[start:start + k]``; where that runs past the end, the pattern repeats (``start`` is before the end).

    A match close to the end means a short period (``a b a b``): the guess carries the period on.
    """
    length = len(tokens)
    out: list[int] = []
    for j in range(k):
        at = start + j
        out.append(tokens[at] if at < length else out[at - length])
    return out


def ngram_draft(tokens: Sequence[int], k: int, max_n: int = DEFAULT_MAX_N, min_n: int = DEFAULT_MIN_N) -> list[int]:
    """The draft :class:`NgramDrafter` proposes for ``tokens`` (one-off, for tests and tools)."""
    drafter = NgramDrafter(max_n, min_n)
    drafter.limit = k
    drafter.extend(tokens)
    return drafter.draft(k)
