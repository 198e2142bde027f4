"""Stage 3: read the new GGUF back, run it, and compare it with what it was made from.

Checks, each failing in one line (the file is then never published):

- the header parses, holds every tensor of the reference and says the requested file type;
- the chat template and BOS/EOS ids equal the HF tokenizer's (or the source GGUF's);
- the same conversation renders to the same prompt text and the same token ids on both sides;
- the template's end-of-turn token, and every id transformers stops at, end generation in llama.cpp;
- llama.cpp runs it: logits on a probe text are finite. Against the f16 reference the probe's
  same-top-token rate and KL are recorded (the ``--report`` measures quality properly).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import GGUFInfo, read_gguf_info
from tandemlm.models.stops import stop_ids
from tandemlm.quantize.quant_types import QuantType

PROBE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name two colours."},
    {"role": "assistant", "content": "Red and blue."},
    {"role": "user", "content": "And one more, please? Ünïcödé ✓"},
]
PROBE_TOKENS = 64  # tokens of the held-out text run through the new file (and the reference)
SCORER_CONTEXT = 256  # room for the probe conversation's prompt
_MARK = "TANDEMLM_END_OF_TURN_PROBE"


@dataclass
class Verification:
    """What the verify stage found; ``notes`` are informational lines for the user."""

    file_type: int | None = None
    tensors: int = 0
    bits_per_weight: float = 0.0
    template_identical: bool | None = None
    special_ids: dict[str, int | None] = field(default_factory=dict)
    end_of_turn_id: int | None = None
    prompt_tokens_identical: bool | None = None
    probe_same_top: float | None = None
    probe_kl: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal."""
        parts = [f"{self.tensors} tensors", f"{self.bits_per_weight:.2f} bits/weight"]
        if self.template_identical:
            parts.append("chat template identical")
        if self.prompt_tokens_identical:
            parts.append("prompt tokens identical")
        if self.end_of_turn_id is not None:
            parts.append(f"stops at end-of-turn id {self.end_of_turn_id}")
        if self.probe_same_top is not None:
            parts.append(f"probe: {self.probe_same_top:.0%} same top token vs f16")
        return ", ".join(parts)


def verify_gguf(
    path: Path,
    qtype: QuantType,
    hf_folder: Path | None = None,
    reference: Path | None = None,
    n_threads: int | None = None,
    trust_remote_code: bool = False,
) -> Verification:
    """Verifies ``path`` (a ``qtype`` GGUF) against ``hf_folder``'s tokenizer and the ``reference`` GGUF."""
    from tandemlm.quantize.logit_scorers import GGUFScorer

    info = read_gguf_info(path)
    result = Verification(file_type=info.file_type, tensors=len(info.tensors), bits_per_weight=info.bits_per_weight)
    _check_header(path, info, qtype, read_gguf_info(reference) if reference else None)
    if hf_folder is None and reference is not None:
        _check_against_gguf(path, info, read_gguf_info(reference), result)
    scorer = GGUFScorer(path, n_ctx=SCORER_CONTEXT, n_threads=n_threads)
    try:
        if hf_folder is not None:
            _check_against_hf(path, info, scorer, hf_folder, result, trust_remote_code)
        _run_probe(path, scorer, reference, result, n_threads)
    finally:
        scorer.close()
    return result


def _check_header(path: Path, info: GGUFInfo, qtype: QuantType, reference: GGUFInfo | None) -> None:
    if info.file_type != qtype.ftype:
        raise QuantizeError(f"{path}: general.file_type is {info.file_type}, expected {qtype.ftype} ({qtype.label})")
    if reference is not None:
        missing = {t.name for t in reference.tensors} - {t.name for t in info.tensors}
        if missing:
            raise QuantizeError(f"{path} lacks {len(missing)} tensors of {reference.path.name}, e.g. {sorted(missing)[0]}")


def _check_against_gguf(path: Path, info: GGUFInfo, source: GGUFInfo, result: Verification) -> None:
    """A GGUF made from a GGUF keeps its tokenizer metadata unchanged."""
    result.template_identical = info.metadata.get("tokenizer.chat_template") == source.metadata.get("tokenizer.chat_template")
    if not result.template_identical:
        raise QuantizeError(f"{path}: chat template differs from {source.path.name}'s")
    for kind in ("bos", "eos", "eot"):
        if info.token_id(kind) != source.token_id(kind):
            raise QuantizeError(f"{path}: {kind} token id {info.token_id(kind)} differs from {source.path.name}'s {source.token_id(kind)}")
        result.special_ids[kind] = info.token_id(kind)


def _check_against_hf(
    path: Path, info: GGUFInfo, scorer: Any, hf_folder: Path, result: Verification, trust_remote_code: bool = False
) -> None:
    """Template, special ids, prompt tokens and stop tokens agree with the HF tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=trust_remote_code)
    template = info.metadata.get("tokenizer.chat_template")
    result.template_identical = template == tokenizer.chat_template
    if not result.template_identical:
        raise QuantizeError(f"{path}: tokenizer.chat_template differs from {hf_folder}'s chat template")
    for kind in ("bos", "eos"):
        expected, stored = getattr(tokenizer, f"{kind}_token_id"), info.token_id(kind)
        if expected is not None and stored != expected:
            raise QuantizeError(f"{path}: {kind} token id is {stored} but {hf_folder}'s tokenizer says {expected}")
        result.special_ids[kind] = stored
    result.special_ids["eot"] = info.token_id("eot")
    stops = stop_ids(tokenizer, GenerationConfig.from_pretrained(hf_folder) if (hf_folder / "generation_config.json").is_file() else None)
    if template:
        _check_prompt_tokens(path, scorer, tokenizer, result)
        result.end_of_turn_id = end_of_turn_id(tokenizer)
        stops |= {result.end_of_turn_id} if result.end_of_turn_id is not None else set()
    not_stopping = sorted(t for t in stops if not scorer.is_end_of_generation(t))
    if not_stopping:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(t)} ({t})" for t in not_stopping)
        raise QuantizeError(f"{path}: llama.cpp does not stop at {names}, where {hf_folder} ends a turn")


def _check_prompt_tokens(path: Path, scorer: Any, tokenizer: Any, result: Verification) -> None:
    hf_prompt = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
    gguf_prompt = scorer.render_chat(PROBE_MESSAGES)
    hf_ids = tokenizer(hf_prompt, add_special_tokens=False)["input_ids"]
    result.prompt_tokens_identical = gguf_prompt == hf_prompt and scorer.tokenize(gguf_prompt) == list(hf_ids)
    if not result.prompt_tokens_identical:
        raise QuantizeError(f"{path}: the same conversation gives different prompt tokens in llama.cpp and transformers")


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token a chat template writes right after an assistant message, if any."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    tail = text[text.rfind(_MARK) + len(_MARK) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


def _run_probe(path: Path, scorer: Any, reference: Path | None, result: Verification, n_threads: int | None) -> None:
    """Finite logits on the first tokens of the held-out text; top-token agreement with the reference."""
    from tandemlm.quantize.logit_scorers import GGUFScorer
    from tandemlm.quantize.report import heldout_text
    from tandemlm.quantize.report_maths import Agreement

    ids = scorer.tokenize(heldout_text())[:PROBE_TOKENS]
    logits = scorer.logits(ids)
    if not np.isfinite(logits).all():
        raise QuantizeError(f"{path}: llama.cpp produced non-finite logits (NaN or inf): the file is broken")
    if reference is None:
        return
    ref = GGUFScorer(reference, n_ctx=PROBE_TOKENS, n_threads=n_threads)
    try:
        agreement = Agreement()
        agreement.add_window(ref.logits(ids)[:-1], logits[:-1], ids)
    finally:
        ref.close()
    result.probe_same_top, result.probe_kl = agreement.same_top_rate, agreement.kl_mean
