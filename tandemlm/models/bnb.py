"""The bitsandbytes load settings that the transformers engine and the quantize scorer both load with."""

from __future__ import annotations

from typing import Any

from tandemlm.errors import QuantizeError


def bnb_config(bits: int) -> Any:
    """transformers' BitsAndBytesConfig: NF4 with bf16 compute for 4 bits, LLM.int8() for 8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise QuantizeError(f"bitsandbytes loads are 4 or 8 bits, got {bits}")
