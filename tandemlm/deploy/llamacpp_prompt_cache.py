"""The llama.cpp backend's prompt cache beyond the slots: KV states of finished requests, kept in RAM.

A sequence's cache lives in the context only until another request takes that sequence. Before its
cells are dropped, the scheduler saves the sequence's state here (llama.cpp's ``llama_state_seq_get_data``);
a later request whose prompt starts with a saved prefix restores it into whichever sequence it is given
(``llama_state_seq_set_data``) and prefills only what follows, as llama-server's ``--cache-ram`` does.
Entries are evicted least recently used first to stay within the RAM budget. States are keyed by the
adapter they were computed with, and the cache belongs to one engine (one model), so a state is never
restored under other weights.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.scheduling import WorkQueue, common_prefix_len
from tandemlm.errors import EngineError

DEFAULT_CACHE_RAM_MIB = 1024
MIN_SAVED_TOKENS = 32  # shorter prefixes cost about as much to restore as to prefill


@dataclass(frozen=True)
class SavedPrompt:
    """One sequence's KV state: the tokens it holds (positions 0..n-1) under one adapter."""

    tokens: tuple[int, ...]
    adapter: str | None
    state: bytes | ctypes.Array[ctypes.c_uint8]  # the buffer llama.cpp wrote, handed back to it as is


class PromptCache:
    """Saved sequence states within a byte budget, least recently used evicted first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, SavedPrompt] = OrderedDict()  # oldest use first
        self._next_key = 0
        self.size_bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: Sequence[int], adapter: str | None) -> bool:
        """Whether a saved state already holds ``tokens`` as (a prefix of) its own under ``adapter``."""
        wanted = tuple(tokens)
        return any(entry.adapter == adapter and entry.tokens[: len(wanted)] == wanted for entry in self._entries.values())

    def add(self, tokens: Sequence[int], adapter: str | None, state: bytes | ctypes.Array[ctypes.c_uint8]) -> bool:
        """Keeps ``state``; drops saved states it extends (their tokens are a prefix of these), then the least
        recently used ones until the budget holds. False when one state alone is over the budget."""
        if len(state) > self.budget_bytes:
            return False
        saved = SavedPrompt(tuple(tokens), adapter, state)
        for key, entry in list(self._entries.items()):
            if entry.adapter == adapter and saved.tokens[: len(entry.tokens)] == entry.tokens:
                self._remove(key)
        self._entries[self._next_key] = saved
        self._next_key += 1
        self.size_bytes += len(state)
        while self.size_bytes > self.budget_bytes:
            self._remove(next(iter(self._entries)))
            self.evictions += 1
        return True

    def best(self, prompt: Sequence[int], adapter: str | None, limit: int) -> tuple[SavedPrompt | None, int]:
        """The saved state sharing the longest prefix (at most ``limit`` tokens) with ``prompt`` under
        ``adapter``, marked as just used, and that prefix's length; (None, 0) when none shares any."""
        best_key, best_len = -1, 0
        for key, entry in self._entries.items():
            if entry.adapter == adapter:
                common = min(common_prefix_len(entry.tokens, prompt), limit)
                if common > best_len:
                    best_key, best_len = key, common
        if best_key < 0:
            return None, 0
        self._entries.move_to_end(best_key)
        return self._entries[best_key], best_len

    def clear(self) -> None:
        """Forgets every saved state."""
        self._entries.clear()
        self.size_bytes = 0

    def _remove(self, key: int) -> None:
        self.size_bytes -= len(self._entries.pop(key).state)


class LlamaCppPromptCache:
    """The scheduler's half that saves sequence states into a :class:`PromptCache` and restores them; the
    scheduler provides the context, its KV memory, the thread's queues and ``_evict_idle``."""

    _ll: Any  # llama_cpp's low-level bindings
    _ctx: Any  # the llama_context
    _memory: Any  # its KV cache (llama_memory_t)
    _prompt_cache: PromptCache | None  # None: --cache-ram 0
    _work: WorkQueue[LlamaRequest]
    _between_steps: queue.SimpleQueue[Callable[[], None]]  # run by the scheduler thread between steps
    _evict_idle: Callable[..., None]
    restored_tokens: int
    _copy_pending: set[int]  # sequences whose data llama.cpp has yet to copy in (split layout): not saved or restored

    def drop_cached_prompts(self, keep_in_ram: bool = False) -> None:
        """Frees every idle sequence's cells, and forgets the prompt cache too, so that the next requests prefill in
        full (for cold measurements); ``keep_in_ram`` saves the sequences into the prompt cache instead, as if
        other requests had taken every sequence. Runs on the scheduler thread, between steps."""
        done = threading.Event()

        def drop() -> None:
            self._evict_idle(keep=-1, save=keep_in_ram)
            if self._prompt_cache is not None and not keep_in_ram:
                self._prompt_cache.clear()
            done.set()

        if not self._work.running:
            raise EngineError("engine closed")
        self._between_steps.put(drop)
        self._work.items.put(None)  # wakes a scheduler waiting for work
        while not done.wait(0.5):
            if not self._work.running:
                raise EngineError("engine closed")

    def _save_prompt(self, seq: int, tokens: list[int], adapter: str | None) -> None:
        """Copies ``seq``'s KV state (holding ``tokens``) into the prompt cache, unless it holds them already."""
        cache = self._prompt_cache
        if cache is None or len(tokens) < MIN_SAVED_TOKENS or seq in self._copy_pending or cache.covers(tokens, adapter):
            return
        size = self._ll.llama_state_seq_get_size(self._ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = self._ll.llama_state_seq_get_data(self._ctx, buffer, size, seq)
        if written:  # kept as llama.cpp wrote it (restoring hands this very buffer back), not copied
            cache.add(tokens, adapter, buffer if written == size else bytes(memoryview(buffer)[:written]))

    def _restore_prompt(self, request: LlamaRequest, seq: int, reuse: int, beat: int) -> int:
        """Restores into ``seq`` the saved state sharing the longest prefix with the request's prompt when it
        covers more than ``beat`` tokens; the number of prompt tokens ``seq`` holds (``reuse`` if unchanged)."""
        if self._prompt_cache is None or seq in self._copy_pending:
            return reuse
        saved, common = self._prompt_cache.best(request.prompt, request.adapter, max(request.max_reuse, 0))
        if saved is None or common <= beat or common < MIN_SAVED_TOKENS:  # a short prefix is cheaper to prefill
            return reuse
        state = saved.state
        data = state if isinstance(state, ctypes.Array) else (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self._ll.llama_state_seq_set_data(self._ctx, data, len(state), seq):
            # No room for the whole saved state: llama.cpp left seq empty, so the prompt is prefilled.
            self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
            return 0
        self._ll.llama_memory_seq_rm(self._memory, seq, common, -1)  # keep only the shared prefix
        self.restored_tokens += common
        return common
