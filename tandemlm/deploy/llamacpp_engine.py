"""GGUF models through llama-cpp-python, with continuous batching of concurrent requests.

llama-cpp-python's ``Llama`` class decodes one sequence at a time (its server aborts or
serialises concurrent streams). Here one scheduler thread (``llamacpp_scheduler``) owns a
llama.cpp context with ``n_parallel`` sequences in a unified KV cache (or one stream each with
``--kv-layout split``), and every step decodes one
token for each running sequence plus chunks of newly arrived prompts in a single ``llama_decode``
batch. Sampling uses llama.cpp's own sampler chains, one per request, and llguidance for JSON
schemas. This module is the engine's surface: loading, tokenizer and template, requests, close.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from tandemlm.deploy.constraints import Grammars
from tandemlm.deploy.engine import BaseEngine, PromptLogprobScoring
from tandemlm.deploy.llamacpp_adapters import LlamaCppAdapters
from tandemlm.deploy.llamacpp_embed import EMBED_CONTEXT, LlamaCppEmbedder
from tandemlm.deploy.llamacpp_prompt_cache import DEFAULT_CACHE_RAM_MIB
from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.llamacpp_scheduler import LlamaCppScheduler
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.scheduling import drain_tokens
from tandemlm.deploy.types import OPTIONAL_FEATURES, EngineInfo, GeneratedToken, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.hardware import physical_cores
from tandemlm.models.chat_template import Message, render_chat_template
from tandemlm.models.resolve import ModelSource

MIN_SPLIT_CELLS = 64  # fewest KV cells a slot may get under --kv-layout split (llama.cpp pads each stream to 256)


class LlamaCppEngine(LlamaCppScheduler, LlamaCppAdapters, PromptLogprobScoring, BaseEngine):
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
        cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB,
        speculative: str | None = None,
        kv_layout: str = "unified",
    ) -> None:
        check_kv_layout(kv_layout)  # before the weights load
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
        split = kv_split(kv_layout, n_ctx, n_parallel)
        # One thread per physical core, as llama.cpp's own tools (llama-cpp-python takes half the
        # logical CPUs, which on a machine without hyperthreads leaves half the cores idle).
        threads = n_threads or physical_cores()
        ctx_params = llama_cpp.llama_context_default_params()
        # split: one KV stream of n_ctx / n_parallel cells per sequence (the scoring one too), as llama-server -np
        ctx_params.n_ctx = n_ctx // n_parallel * (n_parallel + 1) if split else n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = n_parallel + 1  # the extra sequence is for scoring jobs
        ctx_params.kv_unified = not split  # unified: one pool of n_ctx cells shared by all sequences
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model.model, ctx_params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {n_ctx} tokens for {model_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = self._model.vocab
        self._n_vocab = self._model.n_vocab()
        self._pieces: list[bytes | None] = [None] * self._n_vocab
        self.n_threads = threads
        self._n_ctx = n_ctx
        self._kv_split = split
        self._seq_cells = llama_cpp.llama_n_ctx_seq(self._ctx) if split else n_ctx  # most cells one sequence holds
        self._init_scheduler(n_parallel, n_batch, cache_ram_mib, speculative)
        self._init_adapters()
        self._embedder: LlamaCppEmbedder | None = None
        self._embedder_lock = threading.Lock()
        self.metadata = self._model.metadata()
        self.chat_template = self.metadata.get("tokenizer.chat_template")
        self.info = EngineInfo(
            backend="llama.cpp", model_id=model_id, context_length=self._seq_cells, has_chat_template=bool(self.chat_template)
        )
        if self.chat_template:
            # Renders once now so the first request doesn't pay for importing the template engine.
            render_chat_template(self.chat_template, [{"role": "user", "content": "hi"}], True, "", "")
        self._grammars = Grammars(self._lltokenizer)
        self._bos = self._special_text(self._model.token_bos())
        self._eos = self._special_text(self._model.token_eos())
        self._work.start()

    # ---- tokenizer and template --------------------------------------------------------------
    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes; plain pieces are remembered, since every generated token needs its own."""
        remembered = not special and 0 <= token < self._n_vocab
        if remembered and (known := self._pieces[token]) is not None:
            return known
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        piece = buf.raw[: max(n, 0)]
        if remembered:
            self._pieces[token] = piece
        return piece

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
        """A request reserves its whole budget when admitted. In the unified layout all sequences share
        one KV cache of n_ctx cells: without max_tokens a request gets its fair share (n_ctx / n_parallel, as
        each llama-server slot), at least 256 tokens when the context has room, and ends with "length". In the
        split layout the share is its own sequence's cells."""
        room = self._seq_cells - prompt_len
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
        if not self._stop_scheduler():
            return
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
        self._ll.llama_free(self._ctx)
        self._model.close()


def _available() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("llama_cpp") else "llama-cpp-python is not installed"


def default_gpu_layers(requested: int | None, gpu_build: bool) -> int:
    """Layers to offload: as asked; else all of them (-1) on a GPU build of llama.cpp, as llama-server
    does, and none on a CPU build."""
    if requested is not None:
        return requested
    return -1 if gpu_build else 0


def check_kv_layout(kv_layout: str) -> None:
    """Fails in one line unless ``kv_layout`` is one of ``--kv-layout``'s values."""
    if kv_layout not in ("unified", "split"):
        raise EngineError(f"--kv-layout {kv_layout!r} is not a layout: it takes unified or split")


def kv_split(kv_layout: str, n_ctx: int, n_parallel: int) -> bool:
    """Whether ``--kv-layout`` asks for a KV stream per sequence; a bad layout or too small a share fails in one line."""
    check_kv_layout(kv_layout)
    share = n_ctx // max(n_parallel, 1)
    if kv_layout == "split" and share < MIN_SPLIT_CELLS:
        raise EngineError(
            f"--kv-layout split gives each of the {n_parallel} slots {share} of the {n_ctx} context cells, "
            f"under {MIN_SPLIT_CELLS}: raise --n-ctx or lower --n-parallel"
        )
    return kv_layout == "split"


@register_backend(
    "llama.cpp", description="GGUF files via llama-cpp-python (CPU, Metal, CUDA)", available=_available,
    options={name: name for name in ("n_ctx", "n_threads", "n_gpu_layers", "n_parallel", "speculative", "kv_layout")}
    | {"cache_ram": "cache_ram_mib"},
)
def load_llamacpp(source: ModelSource, **options: Any) -> LlamaCppEngine:
    """Loads ``source`` (a GGUF file) with options n_ctx, n_parallel, n_batch, n_threads, n_gpu_layers,
    cache_ram_mib, speculative, kv_layout, and ``adapters`` ({name: PEFT LoRA folder}) served beside the base."""
    import llama_cpp

    known = {"n_ctx", "n_parallel", "n_batch", "n_threads", "n_gpu_layers", "cache_ram_mib", "speculative", "kv_layout"}
    kwargs = {k: v for k, v in options.items() if k in known and v is not None}
    kwargs["n_gpu_layers"] = default_gpu_layers(
        kwargs.get("n_gpu_layers"), bool(llama_cpp.llama_supports_gpu_offload())
    )
    engine = LlamaCppEngine(str(source.gguf_file()), source.model_id, **kwargs)
    if source.builtin:  # an adapter recording no local base converts against the built-in's HF config
        engine.builtin_base = source.hf_folder
    engine.load_adapters(options.get("adapters"))
    return engine
