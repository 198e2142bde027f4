"""Our settings in vLLM's terms, for the vLLM backend (``vllm_engine``).

Load options become ``EngineArgs`` fields (LoRA sized for the adapters asked for, llguidance for JSON
schemas, a small KV cache on CPU); :class:`SamplingParams` become vLLM's; vLLM's per-position log-prob
entries become :class:`GeneratedToken`. vllm is imported inside the functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandemlm.deploy.types import GeneratedToken, OutputConstraint, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.models.adapter_files import adapter_weights, read_adapter_config

_GIB = 1 << 30
# Our option names -> vLLM EngineArgs names; other EngineArgs fields pass through unchanged.
_ALIASES = {"context_length": "max_model_len", "n_ctx": "max_model_len"}


def engine_args(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``EngineArgs`` fields that load ``options`` make (None values dropped, aliases renamed, ours
    turned into vLLM's), and the adapters asked for ({name: folder}), which switch LoRA on."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    options = {_ALIASES.get(k, k): v for k, v in options.items() if v is not None}
    kv_gib = options.pop("kv_cache_gib", None)
    if kv_gib is not None:
        options["kv_cache_memory_bytes"] = int(float(kv_gib) * _GIB)
    elif current_platform.is_cpu() and "gpu_memory_utilization" not in options:
        # On CPU vLLM otherwise reserves gpu_memory_utilization (0.9) of all RAM for its KV cache.
        options.setdefault("kv_cache_memory_bytes", _GIB)
    adapters = {name: str(path) for name, path in (options.pop("adapters", None) or {}).items()}
    if adapters:
        options.update(_lora_options(adapters))
    options.setdefault("disable_log_stats", True)
    if "structured_outputs_config" not in options:
        # llguidance, as the transformers backend uses, rather than "auto" (xgrammar first): it takes
        # whitespace and separator options per request, and free whitespace lets a weak model pad forever.
        options["structured_outputs_config"] = StructuredOutputsConfig(backend="guidance")
    # Like the other backends, take the options that apply here (the CLI passes every backend's);
    # trust_remote_code comes from the source, which resolve_model checked.
    fields = set(EngineArgs.__dataclass_fields__) - {"model", "tokenizer", "trust_remote_code"}
    return {k: v for k, v in options.items() if k in fields}, adapters


def adapter_rank(folder: Path) -> int:
    """The LoRA rank ``r`` of the PEFT adapter in ``folder`` (0 when its config names none)."""
    return int(read_adapter_config(folder).get("r", 0))


def _lora_options(adapters: dict[str, str]) -> dict[str, Any]:
    """EngineArgs that switch LoRA on for ``adapters``: all resident, the smallest rank vLLM accepts that fits."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = [adapter_rank(adapter_weights(path).parent) for path in adapters.values()]
    allowed = sorted(get_args(MaxLoRARanks))
    if max(ranks) > allowed[-1]:
        raise EngineError(f"vLLM serves LoRA ranks up to {allowed[-1]}; an adapter has rank {max(ranks)}")
    rank = next(r for r in allowed if r >= max(ranks))
    return {"enable_lora": True, "max_loras": len(adapters), "max_cpu_loras": len(adapters), "max_lora_rank": rank}


def sampling_params(params: SamplingParams) -> Any:
    """Our sampling settings as vLLM's (streamed as deltas)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VSamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,  # vLLM treats 0 as greedy, as we do
        top_p=params.top_p,
        top_k=params.top_k,  # 0 disables in both
        min_p=params.min_p,
        seed=params.seed,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,  # vLLM counts generated tokens only, as OpenAI does
        frequency_penalty=params.frequency_penalty,
        logit_bias=dict(params.logit_bias) or None,
        logprobs=params.logprobs,
        structured_outputs=_structured(params.constraint),
        skip_special_tokens=True,  # as the transformers backend does, so backends agree
        output_kind=RequestOutputKind.DELTA,
    )


def scoring_params(top: int) -> Any:
    """vLLM settings that score a prompt: each prompt token's own log-prob plus the ``top`` most likely (raw logits)."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VSamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=top,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def _structured(constraint: OutputConstraint | None) -> Any:
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    from tandemlm.deploy.constraints import JSON_OPTIONS, constraint_schema

    schema = constraint_schema(constraint)
    # load() picks vLLM's llguidance backend, which reads these JSON options from the schema itself:
    # the same compact JSON the transformers backend writes (the schema's own x-guidance wins).
    options = {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return StructuredOutputsParams(json={**schema, "x-guidance": options})


def scored(entry: Any, token_id: int, top: int) -> GeneratedToken:
    """``token_id`` with its log-prob from one of vLLM's per-position dicts (id -> Logprob) and the ``top`` most likely."""
    ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top)
    return GeneratedToken(token_id, "", entry[token_id].logprob, [(tid, logprob) for _, tid, logprob in ranked])
