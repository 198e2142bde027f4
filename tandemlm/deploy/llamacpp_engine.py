"""GGUF models through llama-cpp-python, with continuous batching of concurrent requests.

llama-cpp-python's ``Llama`` class decodes one sequence at a time (its server aborts or
serialises concurrent streams). Here one scheduler thread owns a llama.cpp context with
``n_parallel`` sequences in a unified KV cache, and every step decodes one token for each
running sequence plus chunks of newly arrived prompts in a single ``llama_decode`` batch.
Sampling uses llama.cpp's own sampler chains, one per request, and llguidance for JSON schemas.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tandemlm.deploy.constraints import Grammars
from tandemlm.deploy.engine import BaseEngine
from tandemlm.deploy.llamacpp_adapters import LlamaCppAdapters
from tandemlm.deploy.llamacpp_embed import EMBED_CONTEXT, LlamaCppEmbedder
from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.llamacpp_sampling import RequestSampler, logprob_record, plan_chain
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.scheduling import WorkQueue, common_prefix_len, drain_tokens
from tandemlm.deploy.types import OPTIONAL_FEATURES, EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.hardware import physical_cores
from tandemlm.models.chat_template import Message, render_chat_template
from tandemlm.models.resolve import ModelSource


class LlamaCppEngine(LlamaCppAdapters, BaseEngine):
    """A GGUF model served with continuous batching."""

    features = OPTIONAL_FEATURES

    def __init__(
        self,
        model_path: str,
        model_id: str,
        n_ctx: int = 4096,
        n_parallel: int = 8,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        self._ll = llama_cpp
        set_verbose(False)  # llama.cpp logs every context and graph allocation otherwise
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        try:
            self._model = LlamaModel(path_model=model_path, params=model_params, verbose=False)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not load {model_path}: {exc}") from None
        n_ctx = min(n_ctx, self._model.n_ctx_train()) if n_ctx else self._model.n_ctx_train()
        # One thread per physical core, as llama.cpp's own tools (llama-cpp-python takes half the
        # logical CPUs, which on a machine without hyperthreads leaves half the cores idle).
        threads = n_threads or physical_cores()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_parallel + 1  # the extra sequence is for scoring jobs
        ctx_params.kv_unified = True  # one pool of n_ctx cells shared by all sequences
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model.model, ctx_params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for {model_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = self._model.vocab
        self._n_vocab = self._model.n_vocab()
        self._n_batch = n_batch
        self.n_threads = threads
        self._n_ctx = n_ctx
        # Idle sequences keep their tokens' cache, so a request that shares a prefix with an
        # earlier one (every turn of a chat re-sends the conversation) skips re-decoding it.
        self._idle: dict[int, list[int]] = {seq: [] for seq in range(n_parallel + 1)}
        self._init_adapters()
        self.reused_tokens = 0  # prompt tokens served from a cached prefix instead of decoded
        # Observability (cheap counters the tests read): tokens sampled, and the most sequences one decode sampled for.
        self.sampled_tokens = 0
        self.prefilled_tokens = 0  # prompt tokens decoded (a cancelled prefill stops adding to it)
        self.shared_prefix_tokens = 0  # prompt tokens taken from a running sequence's cells
        self.max_sequences_per_step = 0
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._embedder: LlamaCppEmbedder | None = None
        self._embedder_lock = threading.Lock()
        self.metadata = self._model.metadata()
        self.chat_template = self.metadata.get("tokenizer.chat_template")
        self.info = EngineInfo(
            backend="llama.cpp", model_id=model_id, context_length=n_ctx, has_chat_template=bool(self.chat_template)
        )
        if self.chat_template:
            # Renders once now so the first request doesn't pay for importing the template engine.
            render_chat_template(self.chat_template, [{"role": "user", "content": "hi"}], True, "", "")
        self._grammars = Grammars(self._lltokenizer)
        self._bos = self._special_text(self._model.token_bos())
        self._eos = self._special_text(self._model.token_eos())
        self._work: WorkQueue[LlamaRequest] = WorkQueue(self._loop, "llama.cpp-scheduler")
        self._work.start()

    # ---- tokenizer and template --------------------------------------------------------------
    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        if not self.chat_template:
            raise EngineError(f"{self.info.model_id} has no chat template in its GGUF metadata; use generate instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self._bos, self._eos, tools)

    def chat_template_source(self) -> str | None:
        return self.chat_template

    def special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": self._bos or None, "eos_token": self._eos or None, "pad_token": None}

    def _lltokenizer(self) -> Any:
        """llguidance's view of the vocabulary; a complete grammar allows every end-of-generation token."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        is_eog = self._ll.llama_vocab_is_eog
        eog = [token for token in range(self._n_vocab) if is_eog(self._vocab, token)]
        return lltokenizer_from_vocab(self._vocab, n_vocab=self._n_vocab, eos_token=eog)

    def token_bytes(self, token_id: int) -> bytes:
        return self._piece(token_id)

    def vocab_size(self) -> int:
        return self._n_vocab

    def open_ended_budget(self, prompt_len: int) -> int:
        """All sequences share one KV cache of n_ctx cells, and a request reserves its whole budget
        when admitted: without max_tokens a request gets its fair share (n_ctx / n_parallel, as each
        llama-server slot), at least 256 tokens when the context has room, and ends with "length"."""
        room = self._n_ctx - prompt_len
        share = self._n_ctx // max(len(self._idle) - 1, 1) - prompt_len
        return max(1, min(room, max(share, 256)))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        add_bos = add_special_tokens and self._model.add_bos_token()
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def detokenize(self, token_ids: list[int]) -> str:
        return b"".join(self._piece(t) for t in token_ids).decode("utf-8", "replace")

    # ---- public primitives -------------------------------------------------------------------
    def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GeneratedToken]:
        request = LlamaRequest(
            prompt=list(prompt_ids),
            params=params,
            adapter=self._check_adapter(params.adapter),
            cancelled=cancel or threading.Event(),
        )
        if params.constraint is not None:  # built here, so the scheduler thread never waits on a grammar
            request.matcher = self._grammars.matcher(params.constraint)
        self._submit(request)
        return drain_tokens(request.out, request.cancelled)

    def score_tokens(self, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        return [record.logprob for record in self.prompt_logprobs(prompt_ids, target_ids)]  # type: ignore[misc]

    def prompt_logprobs(
        self, prompt_ids: list[int], target_ids: list[int], top: int = 0, adapter: str | None = None
    ) -> list[GeneratedToken]:
        if top < 0:
            raise EngineError(f"top must be a non-negative number of alternatives, got {top}")
        request = LlamaRequest(
            prompt=list(prompt_ids) + list(target_ids),
            params=None,
            adapter=self._check_adapter(adapter),
            score_targets=list(target_ids),
            score_top=top,
        )
        self._submit(request)
        result = request.out.get()
        if isinstance(result, Exception):
            raise result
        return result

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings from a second context on the same weights (made on first use)."""
        with self._embedder_lock:
            if self._embedder is None:
                if not self._work.running:
                    raise EngineError("engine closed")
                self._embedder = LlamaCppEmbedder(self._ll, self._model.model, min(self._n_ctx, EMBED_CONTEXT), self.n_threads)
        return self._embedder.embed(token_lists)

    def check_params(self, params: SamplingParams) -> None:
        """Also checks a requested JSON schema with llguidance, so a bad one fails before the stream starts."""
        super().check_params(params)
        if params.constraint is not None:
            self._grammars.grammar(params.constraint)

    def close(self) -> None:
        """Stops the scheduler, fails every queued and running request, then frees the context.

        The scheduler is joined before anything is freed, so no decode can run on a freed context;
        requests made afterwards fail at once.
        """
        left = self._work.stop()  # waits out at most one decode step
        if left is None:
            return
        # Requests submitted but never taken by the scheduler (its own lists it failed on exit).
        for item in left:
            item.out.put(EngineError("engine closed"))
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
        self._ll.llama_batch_free(self._batch)
        self._ll.llama_free(self._ctx)
        self._model.close()

    def _submit(self, request: LlamaRequest) -> None:
        if request.reserved > self._n_ctx:
            raise EngineError(f"request needs {request.reserved} tokens but the context holds {self._n_ctx}")
        self._work.submit(request)

    # ---- scheduler thread --------------------------------------------------------------------
    def _loop(self) -> None:
        active: list[LlamaRequest] = []
        pending: list[LlamaRequest] = []
        while self._work.running:
            self._take_new(pending, block=not active and not pending)
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
            cached = sum(len(tokens) for other, tokens in self._idle.items() if other != seq)
            used = sum(r.reserved for r in active) + cached
            if used + request.reserved > self._n_ctx:
                self._evict_idle(keep=seq)
                used -= cached
            if used + request.reserved > self._n_ctx and active:
                break  # wait for KV cells to free up (first come, first served)
            pending.pop(0)
            self._idle.pop(seq)
            if not self._ll.llama_memory_seq_rm(self._memory, seq, reuse, -1):
                self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
                reuse = 0
            reuse = self._share_prefix(request, seq, reuse, active)
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

    def _share_prefix(self, request: LlamaRequest, seq: int, reuse: int, active: list[LlamaRequest]) -> int:
        """Gives ``seq`` a running sequence's cached prefix when it beats ``reuse``; the new length.

        Concurrent requests often share a system prompt or a whole prompt. In the one unified KV cache,
        ``llama_memory_seq_cp`` tags the donor's cells with ``seq`` as well (no copy), so the request
        prefills only what follows; either sequence may end first without touching the other's cells.
        """
        limit = max(request.max_reuse, 0)
        donor, best = -1, reuse
        for other in active:
            if other.seq_id < 0 or other.adapter != request.adapter:
                continue
            common = min(common_prefix_len(other.kv_tokens(), request.prompt), limit)
            if common > best:
                donor, best = other.seq_id, common
        if donor < 0:
            return reuse
        self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._ll.llama_memory_seq_cp(self._memory, donor, seq, 0, best)
        self.shared_prefix_tokens += best
        return best

    def _best_idle(self, request: LlamaRequest) -> tuple[int, int]:
        """The idle sequence whose cached tokens share the longest prefix with the request's prompt."""
        best, best_len = next(iter(self._idle)), -1
        for seq, tokens in self._idle.items():
            same = self._idle_adapter.get(seq) == request.adapter  # a cache under another adapter is no prefix
            common = min(common_prefix_len(tokens, request.prompt), max(request.max_reuse, 0)) if same else 0
            if common > best_len:
                best, best_len = seq, common
        return best, max(best_len, 0)

    def _evict_idle(self, keep: int) -> None:
        for seq in self._idle:
            if seq != keep and self._idle[seq]:
                self._ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
                self._idle[seq] = []

    def _drop_if_cancelled(self, request: LlamaRequest) -> bool:
        if request.cancelled.is_set():
            self._finish(request)
            return True
        return False

    def _step(self, active: list[LlamaRequest]) -> None:
        """One llama_decode over a token from every decoding sequence plus prompt chunks (of one adapter)."""
        active = self._adapter_group(active)
        batch, budget = self._batch, self._n_batch
        batch.n_tokens = 0
        outputs: list[tuple[LlamaRequest, int]] = []
        for request in active:
            if not request.prefilling and budget > 0:
                pos = len(request.prompt) + request.n_generated - 1
                outputs.append((request, self._add(request.generated[-1], pos, request.seq_id, True)))
                budget -= 1
        for request in active:
            if request.prefilling and budget > 0:
                take = min(budget, len(request.prompt) - request.n_past)
                scoring = request.params is None
                first_target = len(request.prompt) - len(request.score_targets) - 1
                for offset in range(take):
                    pos = request.n_past + offset
                    last = pos == len(request.prompt) - 1
                    want = (scoring and first_target <= pos < len(request.prompt) - 1) or (last and not scoring)
                    index = self._add(request.prompt[pos], pos, request.seq_id, want)
                    if want:
                        outputs.append((request, index))
                request.n_past += take
                self.prefilled_tokens += take
                budget -= take
        status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        sampling = sum(1 for request, _ in outputs if request.params is not None)
        self.max_sequences_per_step = max(self.max_sequences_per_step, sampling)
        for request, index in outputs:
            if request.params is None:
                self._record_score(request, index)
            else:
                self._sample(request, index)
        for request in list(active):
            if request.params is None and not request.prefilling:
                self._finish(request, result=request.scores)

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
        assert request.params is not None
        try:
            token = request.sampler.sample(self._ctx, index, self._logits)
        except EngineError as exc:  # this request's grammar failed: it ends alone
            self._finish(request, error=exc)
            return
        self.sampled_tokens += 1
        request.generated.append(token)
        end = bool(self._ll.llama_vocab_is_eog(self._vocab, token))
        text = "" if end else request.decoder.decode(self._piece(token))
        if request.params.logprobs is None:
            request.out.put(GeneratedToken(token, text, end=end))
        else:  # the sampler reads a copy of the logits, so these are still the model's own
            record = logprob_record(self._logits(index), token, request.params.logprobs)
            request.out.put(GeneratedToken(token, text, record.logprob, record.top_logprobs, end=end))
        if end or request.n_generated >= request.params.max_tokens:
            self._finish(request)

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
        request.out.put(error if error is not None else result)


def _available() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("llama_cpp") else "llama-cpp-python is not installed"


def default_gpu_layers(requested: int | None, gpu_build: bool) -> int:
    """Layers to offload: as asked; else all of them (-1) on a GPU build of llama.cpp, as llama-server
    does, and none on a CPU build."""
    if requested is not None:
        return requested
    return -1 if gpu_build else 0


@register_backend(
    "llama.cpp", description="GGUF files via llama-cpp-python (CPU, Metal, CUDA)", available=_available,
    options={name: name for name in ("n_ctx", "n_threads", "n_gpu_layers", "n_parallel")},
)
def load_llamacpp(source: ModelSource, **options: Any) -> LlamaCppEngine:
    """Loads ``source`` (a GGUF file) with options n_ctx, n_parallel, n_batch, n_threads, n_gpu_layers,
    and ``adapters`` ({name: PEFT LoRA folder}) served beside the base."""
    import llama_cpp

    known = {"n_ctx", "n_parallel", "n_batch", "n_threads", "n_gpu_layers"}
    kwargs = {k: v for k, v in options.items() if k in known and v is not None}
    kwargs["n_gpu_layers"] = default_gpu_layers(
        kwargs.get("n_gpu_layers"), bool(llama_cpp.llama_supports_gpu_offload())
    )
    engine = LlamaCppEngine(str(source.gguf_file()), source.model_id, **kwargs)
    if source.builtin:  # an adapter recording no local base converts against the built-in's HF config
        engine.builtin_base = source.hf_folder
    engine.load_adapters(options.get("adapters"))
    return engine
