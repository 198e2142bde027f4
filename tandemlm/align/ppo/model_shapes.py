"""A decoder's shapes and parameter count read from its config.json, for the PPO memory plan (nothing loads).

Dense decoder blocks (Llama, Qwen2/3, Mistral) are counted from their shapes; anything else
transformers knows (MoE, MLA) is built on the meta device and counted exactly.
"""

from __future__ import annotations

from typing import Any

QKV_BIAS_TYPES = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}  # q/k/v biases config.json does not mention
QK_NORM_TYPES = {"qwen3", "qwen3_moe", "olmo2", "gemma3", "gemma3_text"}  # per-head q/k RMSNorms (head_dim each)
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}  # tie embeddings when config.json is silent
NON_DENSE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "kv_lora_rank", "moe_intermediate_size")
# Config keys of models whose CausalLM forward changes the head's output (Gemma 2/3, Cohere, Granite): their
# log-probs come from the model's full logits, not from head_logprobs' chunks.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Logits per head_logprobs chunk (fp32 temporaries): 16 MiB on a CPU, 256 MiB on a GPU, where bigger matmuls pay.
HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def head_chunk_rows(vocab_size: int, cuda: bool) -> int:
    """Token rows per head_logprobs chunk: 85 (CPU) or 1365 (GPU) for a 49k vocab, 27 or 441 for 152k."""
    return max(1, HEAD_CHUNK_ELEMENTS["cuda" if cuda else "cpu"] // vocab_size)


def transforms_logits(config: Any) -> bool:
    """Whether the model's forward scales or caps the head's output (a key set to something but 1), for a
    config.json dict or a loaded model's config object."""
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return any(read(key) not in (None, 1, 1.0) for key in LOGIT_TRANSFORM_KEYS)


def config_dict(config: Any) -> dict[str, Any]:
    """A config.json dict, or a transformers PretrainedConfig, as a plain dict (text part of composite configs)."""
    raw: dict[str, Any] = dict(config) if isinstance(config, dict) else config.to_dict()
    text = raw.get("text_config")
    if isinstance(text, dict) and text:
        merged = {k: v for k, v in raw.items() if k != "text_config"}
        merged.update({k: v for k, v in text.items() if v is not None or k not in merged})
        return merged
    return raw


def block_shapes(cfg: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, intermediate) of a config dict."""
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or h // heads)
    return h, heads, int(cfg.get("num_key_value_heads") or heads), head_dim, int(cfg.get("intermediate_size") or 4 * h)


def count_params_from_shapes(cfg: dict[str, Any]) -> int:
    """Parameters of a dense decoder-only model from its config: embeddings, attention q/k/v/o (+ biases),
    MLP gate/up/down (+ biases), RMSNorms, final norm and an untied lm_head."""
    h, heads, kv_heads, head_dim, inter = block_shapes(cfg)
    layers, vocab, model_type = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"]), str(cfg.get("model_type", ""))
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attn = h * q_dim + 2 * h * kv_dim + q_dim * h
    if cfg.get("attention_bias"):  # Llama-style attention_bias: every projection, o_proj included
        attn += q_dim + 2 * kv_dim + h
    elif model_type in QKV_BIAS_TYPES:  # Qwen2: q/k/v only
        attn += q_dim + 2 * kv_dim
    if model_type in QK_NORM_TYPES:
        attn += 2 * head_dim
    mlp = 3 * h * inter + ((2 * inter + h) if cfg.get("mlp_bias") else 0)
    norms = 2 * h  # input and post-attention RMSNorms
    return vocab * h + layers * (attn + mlp + norms) + h + (0 if tied_embeddings(cfg) else vocab * h)


def tied_embeddings(cfg: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in cfg and cfg["tie_word_embeddings"] is not None:
        return bool(cfg["tie_word_embeddings"])
    return str(cfg.get("model_type", "")) in TIED_BY_DEFAULT


def count_on_meta(cfg: dict[str, Any]) -> int:
    """Exact parameter count of any architecture transformers knows, built on the meta device (no weights)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - the runtime always has them
        raise ValueError("this config is not a dense decoder: pass n_params (transformers is not importable)") from exc
    values = {k: v for k, v in cfg.items() if k != "model_type"}
    config = AutoConfig.for_model(cfg["model_type"], **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
