"""Full next-token distributions, greedy decoding and chat prompts from a GGUF file or an HF folder.

The quality report needs whole logit rows (for KL divergence and top-token agreement), which the
deploy engines do not expose; these two small scorers give the same view of both formats:

- :class:`GGUFScorer`: llama-cpp-python's ``Llama`` with ``logits_all=True`` and an f32 KV cache
  (an f16 cache would add its own rounding to what is measured).
- :class:`HFScorer`: transformers in fp32 on CPU (or the checkpoint dtype / bitsandbytes on a GPU).

Both render chat prompts the way the deploy engines do (transformers' Jinja renderer), so prompt
tokens are comparable across formats.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandemlm.errors import QuantizeError
from tandemlm.hardware import inference_precision, usable_cpus
from tandemlm.models.chat_template import Message
from tandemlm.models.stops import stop_ids
from tandemlm.models.weight_files import weights_bytes


@dataclass(frozen=True)
class Footprint:
    """What a model takes on disk: bytes, weight count and bits per weight."""

    file_bytes: int
    n_params: int

    @property
    def bits_per_weight(self) -> float:
        return self.file_bytes * 8 / max(self.n_params, 1)


class Scorer(Protocol):
    """What the report needs from a model."""

    name: str
    kind: str  # gguf | hf
    footprint: Footprint

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without added BOS/EOS; special tokens written in the text are parsed."""
        ...

    def bos_id(self) -> int | None:
        """The BOS token id when the model prepends one to plain text, else None."""
        ...

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The generation prompt the model's chat template makes of ``messages``."""
        ...

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits, one row per position of ``ids`` (row i predicts token i+1)."""
        ...

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of ``ids``; ends after an end-of-generation token or ``max_tokens``."""
        ...

    def close(self) -> None: ...


def default_threads() -> int:
    """llama.cpp threads for scoring: the cores not already busy (at least one).

    ggml's threads meet at a barrier after every op; with more threads than free cores, each token
    waits for threads the OS has parked. Measured here: the same report took 35 s with 2 threads
    on 2 busy cores and 4 s with 1.
    """
    cores = usable_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


class GGUFScorer:
    """A GGUF file through llama-cpp-python, with every position's logits kept."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike[str], n_ctx: int = 512, n_threads: int | None = None) -> None:
        import llama_cpp

        from tandemlm.models.gguf_info import read_gguf_info

        self.path = Path(path)
        self.name = self.path.name
        info = read_gguf_info(self.path)
        self.footprint = Footprint(info.file_size, info.n_params)
        self._ll = llama_cpp
        threads = n_threads or default_threads()
        f32 = llama_cpp.GGML_TYPE_F32
        try:
            self.llm = llama_cpp.Llama(
                str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                logits_all=True, type_k=f32, type_v=f32, verbose=False,
            )
        except ValueError as exc:
            raise QuantizeError(f"llama.cpp could not load {self.path}: {exc}") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def bos_id(self) -> int | None:
        adds = self._ll.llama_vocab_get_add_bos(self._vocab)
        return int(self.llm.token_bos()) if adds and self.llm.token_bos() >= 0 else None

    def special_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def render_chat(self, messages: Sequence[Message]) -> str:
        from tandemlm.models.chat_template import render_chat_template

        if not self.chat_template:
            raise QuantizeError(f"{self.path} has no chat template in its GGUF metadata")
        bos, eos = self.special_text(self.llm.token_bos()), self.special_text(self.llm.token_eos())
        return render_chat_template(self.chat_template, messages, True, bos, eos)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if self.is_end_of_generation(token) or len(out) >= max_tokens:
                break
        return out

    def close(self) -> None:
        self.llm.close()


class HFScorer:
    """An HF checkpoint through transformers, placed by ``hardware.inference_precision``.

    fp32 on CPU; on a GPU cuda + bf16/fp16, so a report there measures B against a 16-bit A.
    """

    kind = "hf"

    def __init__(self, folder: str | os.PathLike[str], load_in_bits: int | None = None, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(folder)
        self.name = self.path.name
        self._torch = torch
        precision = inference_precision("auto", checkpoint=folder)
        kwargs: dict[str, Any] = {
            "dtype": precision.torch_dtype(), "device_map": precision.device,
            "attn_implementation": precision.attention, "trust_remote_code": trust_remote_code,
        }
        if load_in_bits:
            from tandemlm.models.bnb import bnb_config

            # 16-bit unquantized parts (not the checkpoint's fp32): FlashAttention-2 may be the attention.
            kwargs.update(device_map="auto", quantization_config=bnb_config(load_in_bits))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs).eval()
        self.device = next(self.model.parameters()).device
        self.footprint = Footprint(weights_bytes(self.path), int(self.model.num_parameters()))
        self.eos_ids = stop_ids(self.tokenizer, self.model.generation_config)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def bos_id(self) -> int | None:
        with_specials = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None and with_specials and with_specials[0] == bos else None

    def render_chat(self, messages: Sequence[Message]) -> str:
        if not self.tokenizer.chat_template:
            raise QuantizeError(f"{self.path} has no chat template (tokenizer_config.json / chat_template.jinja)")
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def is_end_of_generation(self, token: int) -> bool:
        return token in self.eos_ids

    def logits(self, ids: list[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        from transformers import GenerationConfig

        torch = self._torch
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max_tokens, eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0),
        )
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids], device=self.device), generation_config=config)
        return [int(t) for t in out[0, len(ids) :].tolist()]

    def close(self) -> None:
        del self.model


def open_scorer(ref: str | os.PathLike[str], n_ctx: int = 512, n_threads: int | None = None, load_in_bits: int | None = None) -> Scorer:
    """A scorer for a model reference: a ``.gguf`` file, an HF folder, or a built-in name (its GGUF)."""
    from tandemlm.models.resolve import resolve_model

    source = resolve_model(ref) if not str(ref).endswith(".gguf") else None
    if source is None or source.kind == "gguf":
        path = source.path if source is not None else Path(ref)
        if not path.is_file():
            raise QuantizeError(f"model path {ref} does not exist")
        return GGUFScorer(path, n_ctx=n_ctx, n_threads=n_threads)
    return HFScorer(source.path, load_in_bits=load_in_bits, trust_remote_code=source.trust_remote_code)

