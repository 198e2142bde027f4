"""The llama.cpp backend's scheduler thread: continuous batching of every request on one context.

One thread owns the context's ``n_parallel`` (+1 for scoring) sequences in a unified KV cache, or in one
KV stream each (``--kv-layout split``, llama-server's ``-np`` layout). Each step decodes one token for every running sequence plus chunks of newly arrived prompts in a single
``llama_decode`` batch; requests join and leave between steps. Idle sequences keep their tokens'
cache, so a request sharing a prefix with an earlier one (or with a running one) skips re-decoding it.
:class:`LlamaCppScheduler` is the scheduler half of ``LlamaCppEngine``; the engine provides the
context, vocabulary and token pieces it names, and ``LlamaCppAdapters`` the per-step adapter switch.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import numpy as np

from tandemlm.deploy.llamacpp_prompt_cache import DEFAULT_CACHE_RAM_MIB, LlamaCppPromptCache, PromptCache
from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.llamacpp_sampling import RequestSampler, logprob_record, plan_chain
from tandemlm.deploy.llamacpp_speculative import LlamaCppSpeculative
from tandemlm.deploy.scheduling import WorkQueue, common_prefix_len
from tandemlm.deploy.types import GeneratedToken
from tandemlm.errors import EngineError


class LlamaCppScheduler(LlamaCppPromptCache, LlamaCppSpeculative):
    """Admission, prefix reuse, decode steps and sampling for an engine holding the names below."""

    _ll: Any  # llama_cpp's low-level bindings
    _ctx: Any  # the llama_context every step decodes with
    _memory: Any  # its KV cache (llama_memory_t)
    _vocab: Any  # the model's llama_vocab pointer
    _n_vocab: int
    _n_ctx: int  # KV cells shared by all sequences (unified), or split evenly among the slots
    _kv_split: bool  # one KV stream per sequence: each sequence's attention spans its own cells only
    _seq_cells: int  # most cells one sequence holds: n_ctx (unified), its stream's size (split)
    _piece: Callable[[int], bytes]  # a token's bytes (the engine's tokenizer)
    _adapter_group: Callable[[list[LlamaRequest]], list[LlamaRequest]]  # LlamaCppAdapters: one adapter's requests

    def _init_scheduler(
        self, n_parallel: int, n_batch: int, cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB, speculative: str | None = None
    ) -> None:
        """Sets up the sequences, batch and counters; the engine starts ``_work`` once it can answer requests."""
        if speculative not in (None, "ngram"):
            raise EngineError(f"--speculative {speculative!r} is not a mode: it takes 'ngram' (leave it out to decode plainly)")
        if cache_ram_mib < 0:
            raise EngineError(f"--cache-ram must be 0 (off) or a number of MiB, got {cache_ram_mib}")
        self._speculative = speculative
        self._spec_rollback: bool | None = None  # whether drafts can be taken back (found on first use)
        self._prompt_cache = PromptCache(cache_ram_mib << 20) if cache_ram_mib else None
        # Idle sequences keep their tokens' cache, so a request that shares a prefix with an
        # earlier one (every turn of a chat re-sends the conversation) skips re-decoding it.
        self._idle: dict[int, list[int]] = {seq: [] for seq in range(n_parallel + 1)}
        # The adapter each idle sequence's cache was computed with: a prefix is reused only under the same one.
        self._idle_adapter: dict[int, str | None] = {}
        self.reused_tokens = 0  # prompt tokens served from a cached prefix instead of decoded
        # Observability (cheap counters the tests read): tokens sampled, and the most sequences one decode sampled for.
        self.sampled_tokens = 0
        self.prefilled_tokens = 0  # prompt tokens decoded (a cancelled prefill stops adding to it)
        self.shared_prefix_tokens = 0  # prompt tokens taken from a running sequence's cells
        self.restored_tokens = 0  # prompt tokens restored from the prompt cache beyond the slots
        self.max_sequences_per_step = 0
        self.spec_draft_tokens = 0  # n-gram drafts put in batches to be checked (--speculative ngram)
        self.spec_accepted_tokens = 0  # drafts the model's own sampling agreed with, so kept
        self._n_batch = n_batch
        self._batch = self._ll.llama_batch_init(n_batch, 0, 1)
        self._work: WorkQueue[LlamaRequest] = WorkQueue(self._loop, "llama.cpp-scheduler")
        self._between_steps: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run on the thread
        # What a step sampled or ended, handed to the requests' streams just before the next decode (see _flush_outbox).
        self._outbox: list[tuple[LlamaRequest, Any]] = []
        self._copy_pending: set[int] = set()  # split layout: sequences whose stream llama.cpp copies at the next decode

    def counters(self) -> dict[str, int]:
        """The scheduler's counts for ``/metrics``: prompt tokens prefilled, and taken from any cache (idle or
        running sequences, or the prompt cache, which ``prompt_cache_restored_tokens`` counts on its own)."""
        return {
            "prompt_tokens_prefilled": self.prefilled_tokens,
            "prompt_tokens_cached": self.reused_tokens,
            "prompt_cache_restored_tokens": self.restored_tokens,
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
        }

    def _submit(self, request: LlamaRequest) -> None:
        if request.reserved > self._seq_cells:
            holder = "a slot of --kv-layout split holds" if self._kv_split else "the context holds"
            raise EngineError(f"request needs {request.reserved} tokens but {holder} {self._seq_cells}")
        self._work.submit(request)

    def _stop_scheduler(self) -> bool:
        """Stops the thread (waiting out at most one decode step), fails the requests it never took and
        frees the batch; False when it was stopped already."""
        left = self._work.stop()
        if left is None:
            return False
        # Requests submitted but never taken by the scheduler (its own lists it failed on exit).
        for item in left:
            item.out.put(EngineError("engine closed"))
        self._ll.llama_batch_free(self._batch)
        return True

    # ---- the thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        active: list[LlamaRequest] = []
        pending: list[LlamaRequest] = []
        while self._work.running:
            if not active:
                self._flush_outbox()  # nothing is held back while the thread waits for work
            self._take_new(pending, block=not active and not pending)
            while not self._between_steps.empty():
                self._between_steps.get()()
            pending[:] = [r for r in pending if not self._drop_if_cancelled(r)]  # cancelled while queued
            self._admit(pending, active)
            active = [r for r in active if not self._drop_if_cancelled(r)]
            if not active:
                continue
            try:
                self._step(active)
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep the engine alive
                for request in active:
                    self._finish(request, error=EngineError(f"llama.cpp decode failed: {exc}"))
                active = []
            active = [r for r in active if r.seq_id >= 0]
        for request in active + pending:
            self._finish(request, error=EngineError("engine closed"))
        self._flush_outbox()

    def _take_new(self, pending: list[LlamaRequest], block: bool) -> None:
        try:
            item = self._work.items.get(timeout=0.5) if block else self._work.items.get_nowait()
            while True:
                if item is not None:
                    pending.append(item)
                item = self._work.items.get_nowait()
        except queue.Empty:
            return

    def _admit(self, pending: list[LlamaRequest], active: list[LlamaRequest]) -> None:
        while pending and self._idle:
            request = pending[0]
            seq, reuse = self._best_idle(request)
            if not self._kv_split and not self._pool_has_room(request, seq, active):
                break  # wait for KV cells to free up (first come, first served)
            pending.pop(0)
            tokens = self._idle.pop(seq)
            if reuse < len(tokens):  # what the request cannot use is kept in RAM before its cells go
                self._save_prompt(seq, tokens, self._idle_adapter.get(seq))
            if not self._ll.llama_memory_seq_rm(self._memory, seq, reuse, -1):
                self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
                reuse = 0
            donor, shareable = self._best_running(request, active)
            reuse = self._restore_prompt(request, seq, reuse, beat=max(reuse, shareable))
            if shareable > reuse:
                reuse = self._share_prefix(seq, donor, shareable)
            request.seq_id, request.n_past = seq, reuse
            self.reused_tokens += reuse
            if request.params is not None:
                try:
                    stages = plan_chain(request.params, self._n_vocab, request.prompt)
                    request.sampler = RequestSampler(self._ll, stages, self._n_vocab, request.matcher)
                except EngineError as exc:
                    self._finish(request, error=exc)
                    continue
            active.append(request)

    def _pool_has_room(self, request: LlamaRequest, seq: int, active: list[LlamaRequest]) -> bool:
        """Whether the unified cache holds ``request`` in ``seq`` beside the running requests, after freeing the
        other idle sequences' cells (saved to the prompt cache) if it must; with nothing running it always does."""
        cached = sum(len(tokens) for other, tokens in self._idle.items() if other != seq)
        used = sum(r.reserved for r in active) + cached
        if used + request.reserved > self._n_ctx:
            self._evict_idle(keep=seq)
            used -= cached
        return used + request.reserved <= self._n_ctx or not active

    def _best_running(self, request: LlamaRequest, active: list[LlamaRequest]) -> tuple[int, int]:
        """The running sequence (under the same adapter) sharing the longest prompt prefix, and its length."""
        limit = max(request.max_reuse, 0)
        donor, best = -1, 0
        for other in active:
            if other.seq_id < 0 or other.adapter != request.adapter:
                continue
            common = min(common_prefix_len(other.kv_tokens(), request.prompt), limit)
            if common > best:
                donor, best = other.seq_id, common
        return donor, best

    def _share_prefix(self, seq: int, donor: int, length: int) -> int:
        """Gives ``seq`` the first ``length`` cells of the running sequence ``donor``; ``length``.

        Concurrent requests often share a system prompt or a whole prompt. In the one unified KV cache,
        ``llama_memory_seq_cp`` tags the donor's cells with ``seq`` as well (no copy), so the request
        prefills only what follows; either sequence may end first without touching the other's cells.
        In the split layout llama.cpp copies the donor's whole stream into ``seq``'s at the next decode
        (a memory copy, far cheaper than a prefill), and the cells past ``length`` are dropped; until that
        decode ``seq``'s stream holds stale data, so it is neither saved nor restored into (``_copy_pending``).
        """
        self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        if self._kv_split:
            self._ll.llama_memory_seq_cp(self._memory, donor, seq, -1, -1)
            self._ll.llama_memory_seq_rm(self._memory, seq, length, -1)
            self._copy_pending.add(seq)
        else:
            self._ll.llama_memory_seq_cp(self._memory, donor, seq, 0, length)
        self.shared_prefix_tokens += length
        return length

    def _best_idle(self, request: LlamaRequest) -> tuple[int, int]:
        """The idle sequence whose cached tokens share the longest prefix with the request's prompt.

        In the split layout ties go to the lowest sequence: llama.cpp decodes a batch's streams in one ubatch
        only while their sequence numbers run without a gap, so running requests are kept packed low."""
        best, best_len = next(iter(self._idle)), -1
        for seq, tokens in sorted(self._idle.items()) if self._kv_split else self._idle.items():
            same = self._idle_adapter.get(seq) == request.adapter  # a cache under another adapter is no prefix
            common = min(common_prefix_len(tokens, request.prompt), max(request.max_reuse, 0)) if same else 0
            if common > best_len:
                best, best_len = seq, common
        return best, max(best_len, 0)

    def _evict_idle(self, keep: int, save: bool = True) -> None:
        """Frees every idle sequence's cells but ``keep``'s, saving their states in the prompt cache first."""
        for seq in self._idle:
            if seq != keep and self._idle[seq]:
                if save:
                    self._save_prompt(seq, self._idle[seq], self._idle_adapter.get(seq))
                self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
                self._idle[seq] = []

    def _drop_if_cancelled(self, request: LlamaRequest) -> bool:
        if request.cancelled.is_set():
            self._finish(request)
            return True
        return False

    # ---- one decode step ---------------------------------------------------------------------
    def _step(self, active: list[LlamaRequest]) -> None:
        """One llama_decode over a token from every decoding sequence plus prompt chunks (of one adapter)."""
        active = self._adapter_group(active)
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[tuple[LlamaRequest, int]] = []
        drafts: dict[int, list[int]] = {}  # batch index of a sequence's last token -> the drafts after it
        for request, draft, take in self._plan_step(active):
            if take:
                outputs += self._add_prompt_chunk(request, take)
                continue
            index = self._add_decoding(request, draft)
            if draft:
                drafts[index] = draft
            outputs.append((request, index))
        self._flush_outbox()
        status = self._ll.llama_decode(self._ctx, batch)
        self._copy_pending.clear()  # the decode made llama.cpp's pending stream copies first
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        sampling = sum(1 for request, _ in outputs if request.params is not None)
        self.max_sequences_per_step = max(self.max_sequences_per_step, sampling)
        for request, index in outputs:
            if request.params is None:
                self._record_score(request, index)
            elif index in drafts:
                self._verify(request, index, drafts[index])
            else:
                self._sample(request, index)
        for request in list(active):
            if request.params is None and not request.prefilling:
                self._finish(request, result=request.scores)

    def _plan_step(self, active: list[LlamaRequest]) -> list[tuple[LlamaRequest, list[int], int]]:
        """What each request puts in this step's batch: a decoding one its last token and any drafts (take 0), a
        prefilling one its next ``take`` prompt tokens; decoding first, prompts in the room left. In the split
        layout the plan runs in sequence order: llama.cpp cuts a new ubatch wherever the sequence numbers of a
        batch's streams do not run on by one."""
        budget = self._n_batch
        room = budget - sum(1 for request in active if not request.prefilling)  # for drafts, after one token each
        plan: list[tuple[LlamaRequest, list[int], int]] = []
        for request in active:
            if not request.prefilling and budget > 0:
                draft = self._draft(request, min(room, budget - 1)) if self._speculative else []
                room -= len(draft)
                budget -= 1 + len(draft)
                plan.append((request, draft, 0))
        for request in active:
            if request.prefilling and budget > 0:
                take = min(budget, len(request.prompt) - request.n_past)
                budget -= take
                plan.append((request, [], take))
        return sorted(plan, key=lambda item: item[0].seq_id) if self._kv_split else plan

    def _add_decoding(self, request: LlamaRequest, draft: list[int]) -> int:
        """Adds a decoding request's last token and the drafts after it; the batch index of that token."""
        pos = len(request.prompt) + request.n_generated - 1
        index = self._add(request.generated[-1], pos, request.seq_id, True)
        for offset, token in enumerate(draft, 1):
            self._add(token, pos + offset, request.seq_id, True)
        self.spec_draft_tokens += len(draft)
        return index

    def _add_prompt_chunk(self, request: LlamaRequest, take: int) -> list[tuple[LlamaRequest, int]]:
        """Adds the request's next ``take`` prompt tokens; the outputs wanted among them (a scoring job's targets,
        else the prompt's last token)."""
        outputs = []
        scoring = request.params is None
        first_target = len(request.prompt) - len(request.score_targets) - 1
        for pos in range(request.n_past, request.n_past + take):
            last = pos == len(request.prompt) - 1
            want = (scoring and first_target <= pos < len(request.prompt) - 1) or (last and not scoring)
            index = self._add(request.prompt[pos], pos, request.seq_id, want)
            if want:
                outputs.append((request, index))
        request.n_past += take
        self.prefilled_tokens += take
        return outputs

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch = self._batch
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = logits
        batch.n_tokens = i + 1
        return i

    def _logits(self, index: int) -> np.ndarray:
        """The raw logits of batch output ``index`` (a view of llama.cpp's buffer until the next decode)."""
        return np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))

    def _record_score(self, request: LlamaRequest, index: int) -> None:
        target = request.score_targets[len(request.scores)]
        request.scores.append(logprob_record(self._logits(index), target, request.score_top))

    def _sample(self, request: LlamaRequest, index: int) -> None:
        if self._emit(request, index) and request.seq_id >= 0:
            self._finish(request)

    def _emit(self, request: LlamaRequest, index: int) -> bool:
        """Samples from output ``index`` and streams the token; True once the request is done (the
        caller finishes it), or failed (finished here with its error)."""
        assert request.params is not None
        try:
            token = request.sampler.sample(self._ctx, index, self._logits)
        except EngineError as exc:  # this request's grammar failed: it ends alone
            self._finish(request, error=exc)
            return True
        self.sampled_tokens += 1
        request.generated.append(token)
        end = bool(self._ll.llama_vocab_is_eog(self._vocab, token))
        text = "" if end else request.decoder.decode(self._piece(token))
        if request.params.logprobs is None:
            self._outbox.append((request, GeneratedToken(token, text, end=end)))
        else:  # the sampler reads a copy of the logits, so these are still the model's own
            record = logprob_record(self._logits(index), token, request.params.logprobs)
            self._outbox.append((request, GeneratedToken(token, text, record.logprob, record.top_logprobs, end=end)))
        return end or request.n_generated >= request.params.max_tokens

    def _finish(self, request: LlamaRequest, result: Any = None, error: Exception | None = None) -> None:
        if request.seq_id >= 0:
            if error is None:
                self._idle[request.seq_id] = request.kv_tokens()
                self._idle_adapter[request.seq_id] = request.adapter
            else:  # the cache may hold a partly decoded batch: start this sequence afresh
                self._ll.llama_memory_seq_rm(self._memory, request.seq_id, -1, -1)
                self._idle[request.seq_id] = []
            request.seq_id = -1
        if request.sampler is not None:
            request.sampler.free()
            request.sampler = None
        self._outbox.append((request, error if error is not None else result))

    def _flush_outbox(self) -> None:
        """Hands the tokens and ends of the last step to their streams. Held until the next ``llama_decode``
        starts, so the streams' threads wake while the decode runs outside the GIL, not while this thread
        samples and builds the batch: each wakeup there would take the GIL from the decode's critical path."""
        for request, item in self._outbox:
            request.out.put(item)
        self._outbox.clear()
