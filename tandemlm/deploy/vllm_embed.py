"""Text embeddings on the vLLM backend: a second vLLM engine, with the pooling runner, on the same model.

A vLLM engine runs one runner, and a generation engine cannot pool; so on the first embedding request the
generation engine builds this one from its own load arguments with ``runner="pooling"``, ``convert="embed"``
and vLLM's mean pooling with its embedding head's L2 normalisation on: the mean of the last layer's normalised
hidden states over the input's tokens, unit length, as the llama.cpp and transformers backends give. It is
built and stepped on the generation engine's thread, between generation steps (vLLM keeps its forward context
in a module global, so two engines' forward passes must never overlap), and closed with it.

Memory: a second copy of the weights, a KV cache for one input of ``max_model_len`` tokens and the activations
of one such pass. On a GPU they come out of what the generation engine left free (``1 - gpu_memory_utilization``
of the GPU: 8% at vLLM 0.32's default 0.92); load the engine with a lower ``gpu_memory_utilization`` to make
room for a larger model. On CPU they are RAM.
"""

from __future__ import annotations

import uuid
from typing import Any

from tandemlm.deploy.engine import check_embed_inputs
from tandemlm.deploy.vllm_runtime import contained
from tandemlm.errors import EngineError

# Generation engine load arguments that do not apply to the pooling copy: LoRA (embeddings use the base),
# sampling and decoding settings, the scheduler and memory sizes (set here), and what the pooling runner sets.
_NOT_FOR_POOLING = frozenset({
    "enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "fully_sharded_loras", "lora_dtype",
    "lora_target_modules", "default_mm_loras", "structured_outputs_config", "logprobs_mode", "max_logprobs",
    "logits_processors", "generation_config", "override_generation_config", "reasoning_parser",
    "reasoning_config", "speculative_config", "spec_method", "spec_model", "spec_tokens", "max_num_seqs",
    "max_num_batched_tokens", "enable_chunked_prefill", "enable_prefix_caching", "async_scheduling",
    "gpu_memory_utilization", "kv_cache_memory_bytes", "num_gpu_blocks_override",
    "runner", "convert", "pooler_config",
})


class VLLMEmbedder:
    """A pooling vLLM engine beside the generation engine whose load arguments and ``vllm_config`` it is given.

    Not thread-safe: the generation engine's thread is its only caller.
    """

    def __init__(self, args: dict[str, Any], vllm_config: Any) -> None:
        from vllm.config import PoolerConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.max_tokens = int(vllm_config.model_config.max_model_len)
        pooled = {key: value for key, value in args.items() if key not in _NOT_FOR_POOLING}
        pooled.update(
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(pooling_type="MEAN", use_activation=True),  # activation: L2 normalisation
            max_model_len=self.max_tokens,
            kv_cache_memory_bytes=_one_input_kv_bytes(vllm_config),
            **_free_gpu_share(),
        )
        try:
            with contained():  # what its CPU worker changes process-wide as it loads is undone
                self._llm = LLMEngine.from_engine_args(EngineArgs(**pooled))
        except Exception as exc:  # out of memory, above all: this request fails, generation goes on
            detail = " ".join(str(exc).split())[:300]
            raise EngineError(f"vLLM could not load the pooling copy of the model for embeddings: {detail}") from exc

    def embed(self, token_lists: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per token list (each non-empty and at most ``max_tokens`` tokens), in one batch."""
        from vllm import PoolingParams

        check_embed_inputs(token_lists, self.max_tokens)
        rids = [uuid.uuid4().hex for _ in token_lists]
        vectors: dict[str, list[float]] = {}
        try:
            for rid, ids in zip(rids, token_lists, strict=True):
                self._llm.add_request(rid, {"prompt_token_ids": list(ids)}, PoolingParams(task="embed"))
            while len(vectors) < len(rids):
                for out in self._llm.step():
                    if getattr(out, "error", None) is not None:
                        raise EngineError(f"vLLM failed to embed an input: {out.error}")
                    if out.finished:
                        vectors[out.request_id] = out.outputs.data.float().tolist()
        finally:
            left = [rid for rid in rids if rid not in vectors]
            if left and self._llm.has_unfinished_requests():  # a failure part-way: free what is still queued
                self._llm.abort_request(left)
        return [vectors[rid] for rid in rids]

    def close(self) -> None:
        """Shuts the pooling engine down; in-process this tears down vLLM's process groups, so close it last."""
        self._llm.engine_core.shutdown()


def _one_input_kv_bytes(vllm_config: Any) -> int:
    """KV cache bytes for one ``max_model_len`` input plus a block (an input is pooled whole: no chunked prefill).

    Keys and values of every attention layer at the model's dtype: an upper bound for models with fewer
    (MLA, sliding windows), which is all vLLM checks against at load.
    """
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    per_token = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
    tokens = model.max_model_len + (vllm_config.cache_config.block_size or 16)
    return per_token * model.dtype.itemsize * tokens


def _free_gpu_share() -> dict[str, float]:
    """On a GPU, ``gpu_memory_utilization`` at what is free now (vLLM refuses to start on less free memory than that
    share; the KV cache is sized by ``kv_cache_memory_bytes``, so the share sets no budget). Nothing on CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return {}
    import torch

    share = min(free / total for free, total in map(torch.cuda.mem_get_info, range(torch.cuda.device_count())))
    return {"gpu_memory_utilization": max(share - 0.01, 0.01)}
