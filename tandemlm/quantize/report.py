"""The quality report: how much a quantized model differs from its original, in numbers.

Both models see the same token ids (the original's tokenizer; the quantized one must tokenize the
text identically or the report refuses) in the same windows. Measured:

- file size and bits per weight; the quant type, and what its importance matrix was made from;
- perplexity of each on the evaluation text (``texts.builtin_evaluation()``: self-written modern
  prose plus Shakespeare works never used for calibration; or ``--text FILE``), up to 8,192 tokens,
  and their ratio;
- KL divergence KL(original ‖ quantized) of the next-token distributions per position, in nats:
  mean, median, 99th and 99.9th percentiles and maximum; RMS Δp, the change in the probability of
  the correct next token; how often both put the same token first (llama.cpp's ``llama-perplexity
  --kl-divergence`` measures; it rounds the original's log-probabilities to 16 bits and leaves tokens
  with log p ≤ -16 out of the KL sum, the report does neither: ``bench/quantize_kld_check.py``);
- greedy agreement on a set of chat prompts: shared prefix of the greedy replies, and exact matches;
- prompt and generation speed of each GGUF, by llama.cpp's own ``llama-bench`` (pp512, tg128).

The original's logits wait on disk (``reference.LogitStore``) while the quantized model is scored.
Printed as a rich table and written as JSON, with a flat ``card`` of the quantized side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandemlm.errors import QuantizeError
from tandemlm.models.chat_template import Message
from tandemlm.quantize.reference import LogitStore
from tandemlm.quantize.report_maths import Agreement, KLDStats, greedy_agreement, ratio, relative_change, windows
from tandemlm.quantize.texts import HELDOUT_FILE, Text, builtin_evaluation, text_file

MIN_CONTEXT = 256  # llama.cpp context for the scorers: room for a chat prompt plus its greedy reply
# The flat summary another program reads (a ladder of quant types): exactly these keys, in this order.
CARD_KEYS: tuple[str, ...] = (
    "type", "file_bytes", "bits_per_weight", "ppl", "ppl_ratio", "kld_mean", "kld_median", "kld_p99", "kld_p999",
    "kld_max", "delta_p_rms", "same_top_p", "greedy_agreement", "pp_tok_s", "tg_tok_s", "imatrix",
)

# Chat prompts for greedy agreement: short, varied, answerable by a small instruct model.
PROMPTS: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "Give me three tips for sleeping better."},),
    ({"role": "user", "content": "Write a haiku about the sea."},),
    ({"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Why is the sky blue?"}),
    ({"role": "user", "content": "Translate 'good morning' into Spanish and German."},),
    ({"role": "user", "content": "What is 12 times 7? Explain briefly."},),
    ({"role": "user", "content": "Suggest a name for a small bakery by the sea."},),
    ({"role": "user", "content": "List the planets of the solar system in order."},),
)

Status = Callable[[str], None]


def heldout_text(path: str | os.PathLike[str] | None = None) -> str:
    """The packaged modern prose (the verifier's probe), or the text of ``path``."""
    if path is not None:
        return text_file(path, "--text").content
    return (Path(__file__).resolve().parent.parent / "data" / HELDOUT_FILE).read_text(encoding="utf-8")


def evaluation_text(path: str | os.PathLike[str] | None = None) -> Text:
    """What the report scores: ``--text FILE`` (.txt, or .jsonl rows' text fields) or the built-in evaluation text."""
    return text_file(path, "--text") if path is not None else builtin_evaluation()


@dataclass
class ReportSettings:
    """How much text and how many prompts the report evaluates, and whether it measures speed."""

    window: int = field(default=512, metadata={"help": "Tokens per perplexity window (each scored on its own)."})
    max_text_tokens: int = field(default=8192, metadata={"help": "Most evaluation-text tokens to score."})
    prompts: int = field(default=len(PROMPTS), metadata={"help": "How many chat prompts to decode greedily (0 skips)."})
    greedy_tokens: int = field(default=32, metadata={"help": "Greedy tokens per prompt."})
    text: Path | None = field(default=None, metadata={"help": "A .txt/.jsonl file to score instead of the built-in evaluation text."})
    n_threads: int | None = field(default=None, metadata={"help": "llama.cpp CPU threads (default: the cores not busy)."})
    bench: bool = field(default=True, metadata={"help": "Measure each GGUF's pp512/tg128 speed with llama.cpp's llama-bench."})
    repetitions: int = field(default=3, metadata={"help": "llama-bench repetitions per test (-r)."})

    def __post_init__(self) -> None:
        if self.window < 16:
            raise QuantizeError(f"window must be at least 16 tokens, got {self.window}")
        if self.max_text_tokens < 2:
            raise QuantizeError(f"max_text_tokens must be at least 2, got {self.max_text_tokens}")
        if not 0 <= self.prompts <= len(PROMPTS):
            raise QuantizeError(f"prompts must be between 0 and {len(PROMPTS)}, got {self.prompts}")
        if self.greedy_tokens < 1:
            raise QuantizeError(f"greedy_tokens must be at least 1, got {self.greedy_tokens}")
        if self.repetitions < 1:
            raise QuantizeError(f"repetitions must be at least 1, got {self.repetitions}")


@dataclass
class ModelFigures:
    """One side of the comparison."""

    name: str
    path: str
    kind: str
    file_bytes: int
    n_params: int
    bits_per_weight: float
    perplexity: float
    qtype: str = ""  # F16, Q4_K_M, ... (from the GGUF's file type); HF for a transformers folder
    pp_tok_s: float | None = None  # llama-bench pp512, None when not measured (HF side, or speed skipped)
    tg_tok_s: float | None = None  # llama-bench tg128


@dataclass
class QualityReport:
    """Original vs quantized, as printed and as written to JSON."""

    original: ModelFigures
    quantized: ModelFigures
    text: str  # the evaluation text's name
    scored_tokens: int
    window: int
    size_ratio: float
    perplexity_change: float  # relative: 0.01 means 1% higher
    ppl_ratio: float  # PPL(quantized) / PPL(original)
    kl_mean: float
    kl_p99: float
    kld: KLDStats
    delta_p_rms: float  # RMS of p_quantized - p_original of the correct token, as a fraction
    same_top_rate: float
    greedy_prompts: int
    greedy_tokens: int
    greedy_token_agreement: float
    greedy_exact_rate: float
    template_identical: bool
    prompt_tokens_identical: bool
    imatrix: str | None = None  # what the quantized side's importance matrix was made from
    notes: list[str] = field(default_factory=list)

    def card(self) -> dict[str, Any]:
        """The quantized side in one flat dict with the keys :data:`CARD_KEYS` (speeds None where not measured)."""
        q, kld = self.quantized, self.kld
        values = (
            q.qtype, q.file_bytes, q.bits_per_weight, q.perplexity, self.ppl_ratio, kld.mean, kld.median, kld.p99,
            kld.p999, kld.max, self.delta_p_rms, self.same_top_rate, self.greedy_token_agreement, q.pp_tok_s,
            q.tg_tok_s, self.imatrix,
        )
        return dict(zip(CARD_KEYS, values, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "card": self.card()}

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes the report as JSON (temp file + rename)."""
        from tandemlm.storage.atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> Any:
        """A rich Table: one row per measure, one column per model."""
        from tandemlm.quantize.report_table import report_table

        return report_table(self)


def compare_models(
    original: str | os.PathLike[str],
    quantized: str | os.PathLike[str],
    settings: ReportSettings | None = None,
    status: Status | None = None,
    labels: tuple[str, str] | None = None,
    imatrix: str | None = None,
) -> QualityReport:
    """Measures ``quantized`` against ``original`` (each a ``.gguf`` file, an HF folder or a built-in name).

    ``labels`` name the two columns of the table (default: the file or folder names); ``imatrix``
    says what the quantized side's importance matrix was made from (default: the GGUF's
    ``quantize.imatrix.*`` metadata, as llama-quantize writes it).
    """
    from tandemlm.quantize.logit_scorers import default_threads, open_scorer

    settings = settings or ReportSettings()
    say = status or (lambda _msg: None)
    text = evaluation_text(settings.text)
    threads = settings.n_threads or default_threads()  # one count for every model and both speed tests
    n_ctx = max(settings.window, MIN_CONTEXT)
    say(f"loading {Path(original).name}")
    first = open_scorer(original, n_ctx=n_ctx, n_threads=threads)
    try:
        reference = _measure_reference(first, text.content, settings, say)
    finally:
        first.close()
    try:
        _measure_speed(reference.figures, settings, threads, say)
        say(f"loading {Path(quantized).name}")
        second = open_scorer(quantized, n_ctx=n_ctx, n_threads=threads)
        try:
            report = _measure_against(second, reference, text, settings, say)
        finally:
            second.close()
    finally:
        reference.logits.close()
    _measure_speed(report.quantized, settings, threads, say)
    report.imatrix = imatrix if imatrix is not None else report.imatrix
    if labels:
        report.original.name, report.quantized.name = labels
    return report


@dataclass
class _Reference:
    """What was measured on the original before it was unloaded (memory holds one model at a time)."""

    figures: ModelFigures
    ids: list[int]
    windows: list[list[int]]
    logits: LogitStore
    prompts: list[str]
    prompt_ids: list[list[int]]
    greedy: list[list[int]]


def _measure_reference(scorer: Any, text: str, settings: ReportSettings, say: Status) -> _Reference:
    ids = scorer.tokenize(text)[: settings.max_text_tokens]
    spans = windows(ids, settings.window, scorer.bos_id())
    store = LogitStore(rows=sum(len(span) - 1 for span in spans))
    try:
        for i, window in enumerate(spans, 1):
            say(f"scoring {scorer.name}: window {i}/{len(spans)}")
            store.append(scorer.logits(window)[:-1])
        prompts, prompt_ids, greedy = [], [], []
        for i, messages in enumerate(PROMPTS[: settings.prompts], 1):
            say(f"greedy decoding {scorer.name}: prompt {i}/{settings.prompts}")
            prompts.append(scorer.render_chat(messages))
            prompt_ids.append(scorer.tokenize(prompts[-1]))
            greedy.append(scorer.greedy(prompt_ids[-1], settings.greedy_tokens))
    except BaseException:
        store.close()
        raise
    figures, _ = _figures(scorer, perplexity=0.0)
    return _Reference(figures, ids, spans, store, prompts, prompt_ids, greedy)


def _measure_against(scorer: Any, ref: _Reference, text: Text, settings: ReportSettings, say: Status) -> QualityReport:
    if scorer.tokenize(text.content)[: settings.max_text_tokens] != ref.ids:
        raise QuantizeError(f"{scorer.name} tokenizes the text differently from {ref.figures.name}: they cannot be compared")
    agreement = Agreement()
    for i, window in enumerate(ref.windows):
        say(f"scoring {scorer.name}: window {i + 1}/{len(ref.windows)}")
        agreement.add_window(ref.logits.window(i), scorer.logits(window)[:-1], window)
    greedy, templates_same, tokens_same = [], True, True
    for i, (prompt, prompt_ids) in enumerate(zip(ref.prompts, ref.prompt_ids, strict=True), 1):
        say(f"greedy decoding {scorer.name}: prompt {i}/{len(ref.prompts)}")
        rendered = scorer.render_chat(PROMPTS[i - 1])
        templates_same &= rendered == prompt
        tokens_same &= scorer.tokenize(rendered) == prompt_ids
        greedy.append(scorer.greedy(prompt_ids, settings.greedy_tokens))  # same ids for both models
    token_rate, exact_rate = greedy_agreement(ref.greedy, greedy)
    original = ref.figures
    original.perplexity = agreement.perplexity_original
    quantized, imatrix = _figures(scorer, agreement.perplexity_quantized)
    kld = agreement.kld()
    return QualityReport(
        original=original, quantized=quantized, text=text.name, scored_tokens=agreement.positions,
        window=settings.window, size_ratio=quantized.file_bytes / max(original.file_bytes, 1),
        perplexity_change=relative_change(quantized.perplexity, original.perplexity),
        ppl_ratio=ratio(quantized.perplexity, original.perplexity), kl_mean=kld.mean, kl_p99=kld.p99, kld=kld,
        delta_p_rms=agreement.delta_p_rms, same_top_rate=agreement.same_top_rate, greedy_prompts=len(ref.prompts),
        greedy_tokens=settings.greedy_tokens, greedy_token_agreement=token_rate, greedy_exact_rate=exact_rate,
        template_identical=templates_same, prompt_tokens_identical=tokens_same, imatrix=imatrix,
    )


def _figures(scorer: Any, perplexity: float) -> tuple[ModelFigures, str | None]:
    """A side's figures, and what its importance matrix was made from (per its GGUF metadata)."""
    footprint = scorer.footprint
    qtype, imatrix = gguf_type_and_imatrix(Path(scorer.path)) if scorer.kind == "gguf" else ("HF", None)
    figures = ModelFigures(
        name=scorer.name, path=str(scorer.path), kind=scorer.kind, file_bytes=footprint.file_bytes,
        n_params=footprint.n_params, bits_per_weight=footprint.bits_per_weight, perplexity=perplexity, qtype=qtype,
    )
    return figures, imatrix


def gguf_type_and_imatrix(path: Path) -> tuple[str, str | None]:
    """A GGUF's quant type (``Q4_K_M``, from ``general.file_type``) and, when llama-quantize recorded one
    (``quantize.imatrix.*``), what its importance matrix was made from."""
    from tandemlm.models.gguf_info import read_gguf_info
    from tandemlm.quantize.quant_types import ftype_name, quant_type_for_ftype

    info = read_gguf_info(path)
    ftype = info.file_type
    row = quant_type_for_ftype(ftype) if ftype is not None else None
    qtype = row.label if row is not None else ftype_name(ftype) if ftype is not None else "unknown"
    meta = info.metadata
    source = meta.get("quantize.imatrix.dataset") or meta.get("quantize.imatrix.file")
    if not source:
        return qtype, None
    chunks = meta.get("quantize.imatrix.chunks_count")
    return qtype, f"{source}, {chunks} chunks" if chunks else str(source)


def _measure_speed(figures: ModelFigures, settings: ReportSettings, threads: int, say: Status) -> None:
    """pp512/tg128 by llama-bench for a GGUF side (left None for an HF side or when speed is skipped)."""
    if not settings.bench or figures.kind != "gguf":
        return
    from tandemlm.quantize.speed import measure_speed

    say(f"llama-bench {figures.name}: pp512, tg128 × {settings.repetitions}")
    speed = measure_speed(figures.path, threads, settings.repetitions)
    figures.pp_tok_s, figures.tg_tok_s = speed.pp_tok_s, speed.tg_tok_s


def print_report(report: QualityReport, notes: Sequence[str] = ()) -> None:
    """Prints the table (and any notes) to stdout."""
    from rich.console import Console

    console = Console()
    console.print(report.table())
    for note in [*report.notes, *notes]:
        console.print(f"[dim]{note}[/dim]")
