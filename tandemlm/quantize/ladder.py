"""A ladder of quant types: each type of one model quantized (sharing the conversion and the importance
matrix through the cache) and measured, one table, one JSON, one size-versus-KLD plot, and the
smallest type within a KLD budget.

The rows are the report cards (:meth:`QualityReport.card`), so every number here is the report's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tandemlm.errors import QuantizeError
from tandemlm.quantize.pipeline import QuantizeConfig, QuantizeResult, quantize_model
from tandemlm.quantize.quant_types import get_quant_type
from tandemlm.quantize.report import ReportSettings
from tandemlm.storage.atomic import atomic_path, atomic_write_text

BUDGET_KEY = "kld_mean"  # what --max-kld bounds


def parse_types(spec: str) -> list[str]:
    """``q8_0,q4_k_m`` → canonical names, in order, each known (a miss lists the known types), no repeats."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise QuantizeError("--type needs at least one quant type")
    rows = [get_quant_type(name) for name in names]
    for row in rows:
        if row.stage != "quantize":
            raise QuantizeError(f"--type {spec}: {row.name} is not made by llama.cpp's quantizer, so it has no place in a ladder")
    canonical = [row.name for row in rows]
    repeated = sorted({name for name in canonical if canonical.count(name) > 1})
    if repeated:
        raise QuantizeError(f"--type {spec}: {', '.join(repeated)} given twice")
    return canonical


def run_ladder(base: QuantizeConfig, types: Sequence[str], out_dir: Path, console: Any = None) -> list[QuantizeResult]:
    """Quantizes and reports each of ``types`` (``base`` gives everything else); results go to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = base.report or ReportSettings()
    results = []
    for name in types:
        config = replace(base, qtype=name, out=out_dir / f"{_stem(base)}-{get_quant_type(name).label}.gguf", report=report)
        results.append(quantize_model(config, console))
    return results


def _stem(config: QuantizeConfig) -> str:
    return Path(config.model).stem if Path(config.model).suffix == ".gguf" else Path(config.model).name


def ladder_cards(results: Sequence[QuantizeResult]) -> list[dict[str, Any]]:
    """One report card per result, with the file it describes."""
    cards = []
    for result in results:
        if result.report is None:
            raise QuantizeError(f"{result.path} has no report to put in the ladder")
        cards.append({**result.report.card(), "path": str(result.path)})
    return cards


def smallest_within(cards: Sequence[dict[str, Any]], max_kld: float, key: str = BUDGET_KEY) -> dict[str, Any] | None:
    """The card with the fewest bytes whose ``key`` is at most ``max_kld``; None if no type is within it."""
    fits = [card for card in cards if _finite(card.get(key)) and card[key] <= max_kld]
    return min(fits, key=lambda card: card["file_bytes"], default=None)


def budget_line(cards: Sequence[dict[str, Any]], max_kld: float) -> str:
    """One line naming the smallest type within the budget, or the closest miss."""
    chosen = smallest_within(cards, max_kld)
    if chosen is not None:
        return f"--max-kld {max_kld:g}: {chosen['type']} is the smallest type within it ({chosen[BUDGET_KEY]:.4f} mean KLD, {chosen['file_bytes'] / 2**20:.1f} MiB)"
    best = min(cards, key=lambda card: card[BUDGET_KEY])
    return f"--max-kld {max_kld:g}: no type is within it; the closest is {best['type']} at {best[BUDGET_KEY]:.4f} mean KLD"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (card key, header, format)
    ("type", "type", "{}"),
    ("imatrix", "imatrix", "{}"),
    ("file_bytes", "MiB", "{:.1f}"),
    ("bits_per_weight", "bpw", "{:.2f}"),
    ("ppl_ratio", "PPL ratio", "{:.4f}"),
    ("kld_mean", "KLD mean", "{:.4f}"),
    ("kld_p99", "KLD p99", "{:.4f}"),
    ("kld_p999", "KLD p99.9", "{:.4f}"),
    ("delta_p_rms", "RMS Δp", "{:.2%}"),
    ("same_top_p", "same top", "{:.2%}"),
    ("pp_tok_s", "pp512 t/s", "{:.0f}"),
    ("tg_tok_s", "tg128 t/s", "{:.1f}"),
)


def cell(card: dict[str, Any], key: str, fmt: str) -> str:
    """One table cell: ``-`` for a missing number, MiB for bytes, yes/no for the matrix."""
    value = card.get(key)
    if key == "imatrix":
        return "yes" if value else "no"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value / 2**20 if key == "file_bytes" else value)


def ladder_table(cards: Sequence[dict[str, Any]], chosen: dict[str, Any] | None = None) -> Any:
    """A rich Table, one row per type, the budget's pick in bold."""
    from rich.table import Table

    table = Table(title="quant ladder (each type against the f16/bf16 original)", title_justify="left")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("type", "imatrix") else "right")
    for card in cards:
        style = "bold green" if chosen is not None and card is chosen else None
        table.add_row(*(cell(card, key, fmt) for key, _, fmt in COLUMNS), style=style)
    return table


def write_ladder(cards: Sequence[dict[str, Any]], json_path: Path, plot_path: Path, max_kld: float | None = None) -> None:
    """Writes the cards as JSON and the size-versus-KLD plot (each by temp file + rename)."""
    chosen = smallest_within(cards, max_kld) if max_kld is not None else None
    payload = {"cards": list(cards), "max_kld": max_kld, "chosen": chosen["type"] if chosen else None}
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    plot_ladder(cards, plot_path, max_kld)


def plot_ladder(cards: Sequence[dict[str, Any]], path: Path, max_kld: float | None = None) -> None:
    """Size (MiB) against mean KLD (log scale), one labelled point per type; the budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for card in cards:
        size, kld = card["file_bytes"] / 2**20, max(card[BUDGET_KEY], 1e-6)
        marker = "o" if card.get("imatrix") else "s"
        axes.scatter([size], [kld], marker=marker, color="tab:blue")
        axes.annotate(card["type"], (size, kld), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if max_kld is not None:
        axes.axhline(max_kld, color="tab:red", linestyle="--", linewidth=1, label=f"--max-kld {max_kld:g}")
        axes.legend(loc="upper right")
    axes.set_yscale("log")
    axes.set_xlabel("file size (MiB)")
    axes.set_ylabel("mean KL divergence to the original (nats)")
    axes.set_title("size versus quality (circles: with an importance matrix)")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, ".partial.png") as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
