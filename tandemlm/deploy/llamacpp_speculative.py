"""The llama.cpp scheduler's speculative half (``--speculative ngram``): drafts from n-gram matches, verified in the
step's batch with the request's own sampler, rejected drafts taken back out of the cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.ngram_draft import DEFAULT_DRAFT_TOKENS, NgramDrafter
from tandemlm.errors import EngineError

SPEC_DRAFT_TOKENS = DEFAULT_DRAFT_TOKENS  # most drafts checked per sequence and step (--speculative ngram)


class LlamaCppSpeculative:
    """Drafting and verification for a scheduler that provides the names below."""

    _ll: Any  # llama_cpp's low-level bindings
    _ctx: Any  # the llama_context
    _memory: Any  # its KV cache (llama_memory_t)
    _spec_rollback: bool | None  # whether drafts can be taken back (found on first use)
    spec_accepted_tokens: int
    _emit: Callable[[LlamaRequest, int], bool]  # the scheduler's: samples an output, streams it; True when done
    _finish: Callable[..., None]  # the scheduler's: ends a request (with an error, if given)

    def _draft(self, request: LlamaRequest, room: int) -> list[int]:
        """Tokens to check after the request's last one: an n-gram match's continuation, never past max_tokens.

        A step that keeps every draft also samples one token after them, so at most
        ``max_tokens - n_generated - 1`` are drafted: the sequence stays within the KV cells it reserved.
        """
        assert request.params is not None and request.params.max_tokens is not None
        k = min(room, SPEC_DRAFT_TOKENS, request.params.max_tokens - request.n_generated - 1)
        if k <= 0 or not self._spec_can_roll_back():
            return []
        drafter = request.drafter
        if drafter is None:
            drafter = request.drafter = NgramDrafter()
            drafter.extend(request.prompt)
        drafter.extend(request.generated[len(drafter.tokens) - len(request.prompt) :])
        return drafter.draft(k)

    def _spec_can_roll_back(self) -> bool:
        """Whether rejected drafts can be taken back out of the cache: not from a recurrent model's state,
        so such a model decodes plainly (the same tokens, without the speed-up)."""
        if self._spec_rollback is None:
            model = self._ll.llama_get_model(self._ctx)
            self._spec_rollback = not (self._ll.llama_model_is_recurrent(model) or self._ll.llama_model_is_hybrid(model))
        return self._spec_rollback

    def _verify(self, request: LlamaRequest, index: int, draft: list[int]) -> None:
        """Samples after the last token and each draft in turn, keeping drafts while the sample agrees.

        Output ``index + i`` holds the logits after the last token and ``draft[:i]``: while every draft
        so far was kept, they are the model's own conditional given the actual text, and the request's
        sampler (the same call as plain decoding: one RNG draw, the token accepted into penalties and
        grammar) picks from them. The first pick that differs from the draft is kept and the drafts
        after it are dropped, so the tokens are those plain decoding yields from the same logits, sampled
        or greedy, grammar and log-probs included. The rejected drafts' cells leave the cache. (On the CPU
        backend the logits are the same bits while the cache spans under 512 cells; past that flash
        attention rounds a lone decoded token differently from several, so a near-tie may flip, as with
        batching and cached prefixes: tests/deploy/test_llamacpp_speculative.py.)
        """
        seq, last_pos = request.seq_id, len(request.prompt) + request.n_generated - 1
        kept, done = 0, False
        for i in range(len(draft) + 1):
            done = self._emit(request, index + i)
            if done or i == len(draft) or request.generated[-1] != draft[i]:
                break
            kept += 1
        self.spec_accepted_tokens += kept
        if request.drafter is not None:
            request.drafter.record(len(draft), kept, SPEC_DRAFT_TOKENS)
        if request.seq_id < 0:  # failed (its grammar): _finish cleared the whole sequence
            return
        if kept < len(draft) and not self._ll.llama_memory_seq_rm(self._memory, seq, last_pos + kept + 1, -1):
            self._finish(request, error=EngineError("llama.cpp could not drop rejected draft tokens from the cache"))
            return
        if done:
            self._finish(request)
