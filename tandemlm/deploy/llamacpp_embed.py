"""Text embeddings from a llama.cpp model: a second context of its own, mean-pooled and L2-normalised.

Generation and embedding need different contexts (``embeddings`` on, a pooling type, a whole sequence
in one micro-batch), so the engine builds this one on the first embedding request, on the same loaded
weights. It runs on the caller's thread under a lock of its own and never touches the scheduler's
context, so generation goes on while it works. The vector is llama.cpp's mean pooling of the last
layer's normalised hidden states, L2-normalised as ``llama-server --embedding`` returns it by default.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from tandemlm.deploy.engine import check_embed_inputs
from tandemlm.errors import EngineError

# Tokens per embedded input: mean pooling needs the whole input in one micro-batch.
EMBED_CONTEXT = 2048


class LlamaCppEmbedder:
    """Embeds token lists with ``model`` (a llama.cpp ``llama_model`` pointer) in a context of ``n_ctx`` tokens."""

    def __init__(self, llama: Any, model: Any, n_ctx: int, threads: int) -> None:
        self._ll = llama
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        self._ctx = llama.llama_init_from_model(model, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create an embedding context of {n_ctx} tokens")
        self._memory = llama.llama_get_memory(self._ctx)
        self._batch = llama.llama_batch_init(n_ctx, 0, 1)
        self._width = llama.llama_model_n_embd(model)
        self.n_ctx = n_ctx
        self._lock = threading.Lock()

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per token list (each non-empty and at most ``n_ctx`` tokens)."""
        check_embed_inputs(token_lists, self.n_ctx)
        with self._lock:
            if self._ctx is None:
                raise EngineError("engine closed")
            return [self._one(ids) for ids in token_lists]

    def _one(self, ids: list[int]) -> list[float]:
        ll, batch = self._ll, self._batch
        ll.llama_memory_clear(self._memory, True)
        for pos, token in enumerate(ids):
            batch.token[pos] = token
            batch.pos[pos] = pos
            batch.n_seq_id[pos] = 1
            batch.seq_id[pos][0] = 0
            batch.logits[pos] = True  # every token's hidden state enters the mean
        batch.n_tokens = len(ids)
        status = ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode returned {status} while embedding")
        pooled = ll.llama_get_embeddings_seq(self._ctx, 0)
        vector = [float(pooled[i]) for i in range(self._width)]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def close(self) -> None:
        """Frees the context (waits for an embedding in progress)."""
        with self._lock:
            if self._ctx is not None:
                self._ll.llama_batch_free(self._batch)
                self._ll.llama_free(self._ctx)
                self._ctx = None
