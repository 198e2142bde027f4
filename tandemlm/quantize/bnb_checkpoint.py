"""bitsandbytes 4/8-bit loads for the transformers backend: the ``bnb-4bit``/``bnb-8bit`` types.

Unlike the GGUF types these make no file by default: the HF weights are quantized as they load onto
a CUDA GPU. ``save_bnb_checkpoint`` writes the quantized weights as an HF folder that transformers
reloads without re-quantizing (temp folder + rename).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tandemlm.errors import QuantizeError
from tandemlm.models.bnb import bnb_config
from tandemlm.quantize.quant_types import QuantType
from tandemlm.storage.atomic import save_hf_folder


def bnb_unavailable(qtype: QuantType) -> str | None:
    """Why ``qtype`` cannot load here (no CUDA GPU, no bitsandbytes), or None."""
    from tandemlm.hardware import has_cuda

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
