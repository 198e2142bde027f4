"""The quant types ``tandem quantize --type`` accepts: one row each, with the stage that makes it.

``stage`` says which tool produces the type:

- ``convert``: llama.cpp's converter writes it straight from the HF checkpoint (no quantize stage).
- ``quantize``: ``llama_model_quantize`` makes it from the f16 GGUF the converter wrote.
- ``bitsandbytes``: no file; the transformers backend loads the HF weights in 4/8 bits on a GPU.

``bits`` is the nominal bits per weight of the main block format (bytes per block × 8 / weights
per block, from ggml). The ``_M``/``_S`` k-quant mixes keep some tensors (``attn_v``, ``ffn_down``,
``output``) a step higher, and 1-D tensors stay f32, so a whole file measures somewhat more: the
report prints the measured figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandemlm.errors import QuantizeError


@dataclass(frozen=True)
class QuantType:
    """One quant type: its llama.cpp file type and the ggml block format of its main tensors."""

    name: str  # what users type, lower case
    stage: str  # convert | quantize | bitsandbytes (see the module docstring)
    ftype_const: str | None  # name of the llama_cpp.LLAMA_FTYPE_* constant (None for bitsandbytes)
    block: str | None  # ggml type of the bulk of the weights (gguf.GGMLQuantizationType name)
    description: str
    load_in_bits: int | None = None  # bitsandbytes only
    bnb_bits: float = 0.0  # bitsandbytes only: nominal bits per weight (no ggml block format)
    needs_imatrix: bool = False  # llama.cpp's quantizer refuses the type without an importance matrix

    @property
    def ftype(self) -> int:
        """llama.cpp's ``llama_ftype`` id, read from llama-cpp-python so it matches the compiled library."""
        import llama_cpp

        if self.ftype_const is None:
            raise QuantizeError(f"{self.name} is a bitsandbytes load, not a llama.cpp file type")
        return int(getattr(llama_cpp, self.ftype_const))

    @property
    def bits(self) -> float:
        """Nominal bits per weight of the main block format."""
        if self.block is None:
            return self.bnb_bits
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        weights, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.block]]
        return nbytes * 8 / weights

    @property
    def uses_imatrix(self) -> bool:
        """True when llama.cpp's quantizer weighs this type's rounding by an importance matrix (not q8_0)."""
        return self.stage == "quantize" and self.block != "Q8_0"

    @property
    def is_k_quant(self) -> bool:
        """True for types of 256-weight blocks (k-quants and most i-quants), whose rows must be multiples
        of 256 (else llama.cpp falls back)."""
        if not self.block:
            return False
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType[self.block]][0] == 256

    @property
    def label(self) -> str:
        """The name as llama.cpp spells it (``Q4_K_M``), for file names and tables."""
        return self.name if self.stage == "bitsandbytes" else self.name.upper()


def _row(name: str, stage: str, const: str | None, block: str | None, description: str) -> QuantType:
    return QuantType(name, stage, const, block, description)


def _iq(name: str, block: str, description: str, needs_imatrix: bool = False) -> QuantType:
    """An i-quant (or Q2_K_S): made by the quantizer; the lowest ones only with an importance matrix
    (llama.cpp's ``tensor_requires_imatrix``: IQ1_*, IQ2_XXS/XS/S, IQ3_XXS and Q2_K_S's q2_K tensors)."""
    return QuantType(name, "quantize", f"LLAMA_FTYPE_MOSTLY_{name.upper()}", block, description, needs_imatrix=needs_imatrix)


def _bnb(name: str, load_in_bits: int, bits: float, description: str) -> QuantType:
    return QuantType(name, "bitsandbytes", None, None, description, load_in_bits, bits)


QUANT_TYPES: dict[str, QuantType] = {
    row.name: row
    for row in (
        # Lossless copy of fp32 weights; the reference when comparing against an fp32 HF model.
        _row("f32", "convert", "LLAMA_FTYPE_ALL_F32", "F32", "float32, lossless"),
        # The usual input to the k-quant quantizer; what fp16/bf16 checkpoints are stored in.
        _row("f16", "convert", "LLAMA_FTYPE_MOSTLY_F16", "F16", "float16, near-lossless"),
        # fp32's exponent range in 16 bits; for checkpoints with values beyond fp16's range.
        _row("bf16", "convert", "LLAMA_FTYPE_MOSTLY_BF16", "BF16", "bfloat16, keeps fp32's range"),
        # Round-to-nearest 8 bits, blocks of 32: practically lossless, half of f16.
        _row("q8_0", "quantize", "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", "8-bit, blocks of 32; nearly lossless"),
        # 6-bit k-quant everywhere; within noise of q8_0 at three quarters of its size.
        _row("q6_k", "quantize", "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", "6-bit k-quant"),
        # 5-bit k-quant mix (attn_v/ffn_down partly q6_k): a small, usually invisible loss.
        _row("q5_k_m", "quantize", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", "5-bit k-quant mix (medium)"),
        # 5-bit k-quant everywhere.
        _row("q5_k_s", "quantize", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K", "5-bit k-quant (small)"),
        # 4-bit k-quant mix (attn_v/ffn_down partly q6_k): the usual size/quality pick.
        _row("q4_k_m", "quantize", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", "4-bit k-quant mix (medium); the usual pick"),
        # 4-bit k-quant, fewer tensors kept higher than q4_k_m.
        _row("q4_k_s", "quantize", "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", "4-bit k-quant (small)"),
        # Legacy 4-bit round-to-nearest, blocks of 32; fast everywhere, lossier than q4_k_m.
        _row("q4_0", "quantize", "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", "legacy 4-bit, blocks of 32"),
        # 3-bit k-quant mix: noticeably lossy; for fitting a model into too little memory.
        _row("q3_k_m", "quantize", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", "3-bit k-quant mix; noticeably lossy"),
        # 2-bit k-quant mix: large loss; last resort.
        _row("q2_k", "quantize", "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", "2-bit k-quant mix; large loss"),
        _iq("q2_k_s", "Q2_K", "2-bit k-quant (small); needs an importance matrix", needs_imatrix=True),
        # i-quants: lattice codebooks; best quality per bit with an importance matrix (4-bit and 3-bit S/M/XS
        # work without one, the lowest refuse to).
        _iq("iq4_xs", "IQ4_XS", "4.25-bit i-quant; about q4_k_s quality, smaller"),
        _iq("iq4_nl", "IQ4_NL", "4.5-bit non-linear, blocks of 32"),
        _iq("iq3_m", "IQ3_S", "3.4-bit i-quant mix (medium)"),
        _iq("iq3_s", "IQ3_S", "3.4-bit i-quant"),
        _iq("iq3_xs", "IQ3_S", "3.3-bit i-quant mix (extra small); needs an importance matrix", needs_imatrix=True),
        _iq("iq3_xxs", "IQ3_XXS", "3.06-bit i-quant; needs an importance matrix", needs_imatrix=True),
        _iq("iq2_m", "IQ2_S", "2.7-bit i-quant mix; needs an importance matrix", needs_imatrix=True),
        _iq("iq2_s", "IQ2_S", "2.5-bit i-quant; needs an importance matrix", needs_imatrix=True),
        _iq("iq2_xs", "IQ2_XS", "2.31-bit i-quant; needs an importance matrix", needs_imatrix=True),
        _iq("iq2_xxs", "IQ2_XXS", "2.06-bit i-quant; needs an importance matrix", needs_imatrix=True),
        _iq("iq1_m", "IQ1_M", "1.75-bit i-quant; needs an importance matrix", needs_imatrix=True),
        _iq("iq1_s", "IQ1_S", "1.56-bit i-quant; needs an importance matrix", needs_imatrix=True),
        # NF4 with blocks of 64 and an fp32 scale each (4.5 bits) through bitsandbytes, CUDA only.
        _bnb("bnb-4bit", 4, 4.5, "bitsandbytes NF4 load for the transformers backend (GPU)"),
        # LLM.int8(): int8 weights with fp16 outliers, through bitsandbytes, CUDA only.
        _bnb("bnb-8bit", 8, 8.0, "bitsandbytes int8 load for the transformers backend (GPU)"),
    )
}

# llama-quantize's own aliases.
ALIASES: dict[str, str] = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}


def get_quant_type(name: str) -> QuantType:
    """The row for ``name`` (any case, ``-`` or ``_``); an unknown name lists the known ones."""
    key = name.strip().lower()
    if not key.startswith("bnb"):
        key = key.replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        raise QuantizeError(f"unknown quant type {name!r}; known: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[key]


def quant_type_for_ftype(ftype: int) -> QuantType | None:
    """The row whose llama.cpp file type is ``ftype`` (as stored in ``general.file_type``), if any."""
    for row in QUANT_TYPES.values():
        if row.ftype_const is not None and row.ftype == ftype:
            return row
    return None


def ftype_name(ftype: int) -> str:
    """llama.cpp's name for a file type id (``Q4_1`` for 3), also for types not in the table."""
    import llama_cpp

    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, name) == ftype and name != "LLAMA_FTYPE_GUESSED":
            return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
    return f"file type {ftype}"
