"""bitsandbytes 4/8-bit loads for the transformers backend: the ``bnb-4bit``/``bnb-8bit`` types.

Unlike the GGUF types these make no file by default: the HF weights are quantized as they load onto
a CUDA GPU. ``save_bnb_checkpoint`` writes the quantized weights as an HF folder that transformers
reloads without re-quantizing (temp folder + rename).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tandemlm.models.atomic import save_hf_folder
from tandemlm.quantize.types import QuantizeError, QuantType


def bnb_config(bits: int) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with bf16 compute for 4 bits, LLM.int8() for 8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizeError(f"bitsandbytes loads are 4 or 8 bits, got {bits}")


def bnb_unavailable(qtype: QuantType) -> str | None:
    """Why ``qtype`` cannot load here (no CUDA GPU, no bitsandbytes), or None."""
    from tandemlm.deploy.auto import has_cuda

    if not has_cuda():
        return f"type {qtype.name} needs a CUDA GPU (bitsandbytes); none is visible here. Use a GGUF type such as q4_k_m on CPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"type {qtype.name} needs bitsandbytes: pip install 'tandemlm[gpu]'"
    return None


def require_bnb(qtype: QuantType) -> None:
    """Fails in one line when ``qtype`` cannot load on this machine."""
    reason = bnb_unavailable(qtype)
    if reason:
        raise QuantizeError(reason)


def save_bnb_checkpoint(hf_folder: Path, qtype: QuantType, out: Path, trust_remote_code: bool = False) -> Path:
    """Loads ``hf_folder`` with bitsandbytes and saves the quantized model and tokenizer at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_bnb(qtype)
    assert qtype.load_in_bits is not None
    model = AutoModelForCausalLM.from_pretrained(
        hf_folder, quantization_config=bnb_config(qtype.load_in_bits), device_map="auto", trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=trust_remote_code)
    return save_hf_folder(model, tokenizer, out)
