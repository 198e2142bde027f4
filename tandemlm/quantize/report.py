"""The quality report: how much a quantized model differs from its original, in numbers.

Both models see the same token ids (the original's tokenizer; the quantized one must tokenize the
text identically or the report refuses) in the same windows. Measured:

- file size and bits per weight;
- perplexity of each on a held-out text (``tandemlm/data/quantize_heldout.txt``, self-written
  prose that no model was tuned on), and its relative change;
- KL divergence KL(original ‖ quantized) of the next-token distributions, mean and 99th
  percentile, and how often both put the same token first;
- greedy agreement on a set of chat prompts: shared prefix of the greedy replies, and exact matches.

Printed as a rich table and written as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandemlm.errors import QuantizeError
from tandemlm.models.chat_template import Message
from tandemlm.quantize.metrics import Agreement, greedy_agreement, relative_change, windows

HELDOUT_FILE = "quantize_heldout.txt"
MIN_CONTEXT = 256  # llama.cpp context for the scorers: room for a chat prompt plus its greedy reply

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
    """The held-out text for perplexity (the packaged one unless ``path`` is given)."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantizeError(f"--text {path} cannot be read: {exc}") from None
    return (Path(__file__).resolve().parent.parent / "data" / HELDOUT_FILE).read_text(encoding="utf-8")


@dataclass
class ReportSettings:
    """How much text and how many prompts the report evaluates."""

    window: int = field(default=512, metadata={"help": "Tokens per perplexity window (each scored on its own)."})
    max_text_tokens: int = field(default=2048, metadata={"help": "Most held-out tokens to score."})
    prompts: int = field(default=len(PROMPTS), metadata={"help": "How many chat prompts to decode greedily (0 skips)."})
    greedy_tokens: int = field(default=32, metadata={"help": "Greedy tokens per prompt."})
    text: Path | None = field(default=None, metadata={"help": "A text file to use instead of the packaged held-out text."})
    n_threads: int | None = field(default=None, metadata={"help": "llama.cpp CPU threads (default: the cores not busy)."})

    def __post_init__(self) -> None:
        if self.window < 16:
            raise QuantizeError(f"window must be at least 16 tokens, got {self.window}")
        if self.max_text_tokens < 2:
            raise QuantizeError(f"max_text_tokens must be at least 2, got {self.max_text_tokens}")
        if not 0 <= self.prompts <= len(PROMPTS):
            raise QuantizeError(f"prompts must be between 0 and {len(PROMPTS)}, got {self.prompts}")
        if self.greedy_tokens < 1:
            raise QuantizeError(f"greedy_tokens must be at least 1, got {self.greedy_tokens}")


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


@dataclass
class QualityReport:
    """Original vs quantized, as printed and as written to JSON."""

    original: ModelFigures
    quantized: ModelFigures
    text: str
    scored_tokens: int
    window: int
    size_ratio: float
    perplexity_change: float  # relative: 0.01 means 1% higher
    kl_mean: float
    kl_p99: float
    same_top_rate: float
    greedy_prompts: int
    greedy_tokens: int
    greedy_token_agreement: float
    greedy_exact_rate: float
    template_identical: bool
    prompt_tokens_identical: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Writes the report as JSON (temp file + rename)."""
        from tandemlm.storage.atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self) -> Any:
        """A rich Table: one row per measure, one column per model."""
        from rich.table import Table

        table = Table(title=f"{self.quantized.name} vs {self.original.name}", title_justify="left")
        table.add_column("measure")
        table.add_column(self.original.name, justify="right")
        table.add_column(self.quantized.name, justify="right")
        table.add_column("change", justify="right")
        o, q = self.original, self.quantized
        table.add_row("file size", _mib(o.file_bytes), _mib(q.file_bytes), f"×{self.size_ratio:.3f}")
        table.add_row("bits/weight", f"{o.bits_per_weight:.2f}", f"{q.bits_per_weight:.2f}", "")
        table.add_row(
            f"perplexity ({self.scored_tokens} tokens)", f"{o.perplexity:.4f}", f"{q.perplexity:.4f}", f"{self.perplexity_change:+.2%}"
        )
        table.add_row("KL divergence, mean / p99 (nats)", "", f"{self.kl_mean:.5f} / {self.kl_p99:.5f}", "")
        table.add_row("same top token", "", f"{self.same_top_rate:.2%}", "")
        if self.greedy_prompts:
            table.add_row(
                f"greedy agreement ({self.greedy_prompts} prompts × {self.greedy_tokens} tokens)",
                "", f"{self.greedy_token_agreement:.2%} tokens, {self.greedy_exact_rate:.0%} exact", "",
            )
        table.add_row("chat template / prompt tokens", "", _yes(self.template_identical) + " / " + _yes(self.prompt_tokens_identical), "")
        return table


def compare_models(
    original: str | os.PathLike[str],
    quantized: str | os.PathLike[str],
    settings: ReportSettings | None = None,
    status: Status | None = None,
    labels: tuple[str, str] | None = None,
) -> QualityReport:
    """Measures ``quantized`` against ``original`` (each a ``.gguf`` file, an HF folder or a built-in name).

    ``labels`` name the two columns of the table (default: the file or folder names).
    """
    from tandemlm.quantize.scoring import open_scorer

    settings = settings or ReportSettings()
    say = status or (lambda _msg: None)
    text = heldout_text(settings.text)
    say(f"loading {Path(original).name}")
    n_ctx = max(settings.window, MIN_CONTEXT)
    first = open_scorer(original, n_ctx=n_ctx, n_threads=settings.n_threads)
    try:
        side_a = _measure_reference(first, text, settings, say)
    finally:
        first.close()
    say(f"loading {Path(quantized).name}")
    second = open_scorer(quantized, n_ctx=n_ctx, n_threads=settings.n_threads)
    try:
        report = _measure_against(second, side_a, text, settings, say)
    finally:
        second.close()
    if labels:
        report.original.name, report.quantized.name = labels
    return report


@dataclass
class _Reference:
    """What was measured on the original before it was unloaded (memory holds one model at a time)."""

    figures: ModelFigures
    ids: list[int]
    windows: list[list[int]]
    logits: list[np.ndarray]
    prompts: list[str]
    prompt_ids: list[list[int]]
    greedy: list[list[int]]


def _measure_reference(scorer: Any, text: str, settings: ReportSettings, say: Status) -> _Reference:
    ids = scorer.tokenize(text)[: settings.max_text_tokens]
    spans = windows(ids, settings.window, scorer.bos_id())
    logits = []
    for i, window in enumerate(spans, 1):
        say(f"scoring {scorer.name}: window {i}/{len(spans)}")
        logits.append(scorer.logits(window)[:-1])
    prompts, prompt_ids, greedy = [], [], []
    for i, messages in enumerate(PROMPTS[: settings.prompts], 1):
        say(f"greedy decoding {scorer.name}: prompt {i}/{settings.prompts}")
        prompts.append(scorer.render_chat(messages))
        prompt_ids.append(scorer.tokenize(prompts[-1]))
        greedy.append(scorer.greedy(prompt_ids[-1], settings.greedy_tokens))
    figures = _figures(scorer, perplexity=0.0)
    return _Reference(figures, ids, spans, logits, prompts, prompt_ids, greedy)


def _measure_against(scorer: Any, ref: _Reference, text: str, settings: ReportSettings, say: Status) -> QualityReport:
    if scorer.tokenize(text)[: settings.max_text_tokens] != ref.ids:
        raise QuantizeError(f"{scorer.name} tokenizes the text differently from {ref.figures.name}: they cannot be compared")
    agreement = Agreement()
    for i, (window, logits) in enumerate(zip(ref.windows, ref.logits, strict=True), 1):
        say(f"scoring {scorer.name}: window {i}/{len(ref.windows)}")
        agreement.add_window(logits, scorer.logits(window)[:-1], window)
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
    quantized = _figures(scorer, agreement.perplexity_quantized)
    return QualityReport(
        original=original, quantized=quantized, text=str(settings.text or HELDOUT_FILE), scored_tokens=agreement.positions,
        window=settings.window, size_ratio=quantized.file_bytes / max(original.file_bytes, 1),
        perplexity_change=relative_change(quantized.perplexity, original.perplexity), kl_mean=agreement.kl_mean,
        kl_p99=agreement.kl_p99, same_top_rate=agreement.same_top_rate, greedy_prompts=len(ref.prompts),
        greedy_tokens=settings.greedy_tokens, greedy_token_agreement=token_rate, greedy_exact_rate=exact_rate,
        template_identical=templates_same, prompt_tokens_identical=tokens_same,
    )


def _figures(scorer: Any, perplexity: float) -> ModelFigures:
    footprint = scorer.footprint
    return ModelFigures(
        name=scorer.name, path=str(scorer.path), kind=scorer.kind, file_bytes=footprint.file_bytes,
        n_params=footprint.n_params, bits_per_weight=footprint.bits_per_weight, perplexity=perplexity,
    )


def print_report(report: QualityReport, notes: Sequence[str] = ()) -> None:
    """Prints the table (and any notes) to stdout."""
    from rich.console import Console

    console = Console()
    console.print(report.table())
    for note in [*report.notes, *notes]:
        console.print(f"[dim]{note}[/dim]")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _yes(value: bool) -> str:
    return "identical" if value else "DIFFERENT"
