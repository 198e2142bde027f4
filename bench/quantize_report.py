"""Size and quality per quant type on the built-in model, next to llama.cpp's published figures.

    .venv/bin/python bench/quantize_report.py [--types f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--prompts 4] [--json FILE]

For each type: ``tandem quantize smollm2 --type T`` (cached by content), then the quality report
against the f16 GGUF that llama.cpp's converter made from the HF copy (same engine, same windows of
the packaged held-out text). A first row compares that f16 GGUF with the HF fp32 model itself.

Caveat: the built-in's HF copy is dequantised from its Q4_1 GGUF, so these deltas measure
re-quantizing Q4_1-grid weights, on a 135M model (small models lose more per bit than 7-8B ones).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tandemlm.models.resolve import resolve_model
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model
from tandemlm.quantize.quantizer import Fallback
from tandemlm.quantize.report import QualityReport, ReportSettings, compare_models

# llama.cpp's own measurements, relative to f16, without an importance matrix (wikitext-2 test set).
# Source: tools/perplexity/README.md of the llama.cpp that llama-cpp-python 0.3.36 vendors
# ("LLaMA 3 8b Scoreboard" and "LLaMA 2 vs. LLaMA 3 Quantization comparison" tables, added in
# ggml-org/llama.cpp PR #6936): "Mean PPL ratio", "Mean KLD", "Same top p", and model sizes
# (f16 14.97 GiB, q8_0 7.96 GiB, q4_K_M 4.58 GiB for Llama-3-8B). That version's
# tools/quantize/README.md lists bits/weight and sizes (Llama-3.1-8B) but no perplexity deltas;
# its quantize.cpp help gives absolute ones (Q8_0 +0.0026, Q4_K_M +0.1754 ppl @ Llama-3-8B), and
# older releases' gave them for LLaMA-v1-7B (Q8_0 +0.0004, Q4_K_M +0.0532 ppl; 6.70G and 3.80G vs 13.00G).
REF_COLUMN = "llama.cpp: Δppl ×f16 (L3-8B) | Δppl (L2-7B)"
REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "q8_0": {
        "Llama-3-8B": {"size_ratio": 7.96 / 14.97, "ppl_change": 0.000425, "kl_mean": 0.001355, "same_top": 0.97674},
        "Llama-2-7B": {"ppl_change": 0.000689, "kl_mean": 0.000369, "same_top": 0.98846},
    },
    "q4_k_m": {
        "Llama-3-8B": {"size_ratio": 4.58 / 14.97, "ppl_change": 0.028160, "kl_mean": 0.031273, "same_top": 0.91901},
        "Llama-2-7B": {"ppl_change": 0.014242, "kl_mean": 0.012686, "same_top": 0.94665},
    },
}


def measure(types: list[str], settings: ReportSettings, console: Console) -> tuple[QualityReport, dict[str, QualityReport], dict[str, str]]:
    """(f16 GGUF vs HF fp32, {type: type vs f16 GGUF}, {type: its k-quant fallbacks}) for the built-in model."""
    results = {t: quantize_model(QuantizeConfig(model="smollm2", qtype=t, publish=False), console) for t in types}  # kept in the cache
    f16 = next(r.intermediate for r in results.values() if r.intermediate is not None)
    hf = resolve_model("smollm2").hf_folder()
    reports = {}
    with console.status("report") as status:
        conversion = compare_models(hf, f16, settings, status=status.update, labels=("HF fp32", "F16 GGUF"))
        for qtype, result in results.items():
            reports[qtype] = compare_models(f16, result.path, settings, status=status.update, labels=("F16", result.qtype.label))
    return conversion, reports, {t: _fallbacks(r.fallbacks) for t, r in results.items()}


def _fallbacks(fallbacks: list[Fallback]) -> str:
    counts = Counter(f.stored_as for f in fallbacks)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common()) or "-"


def table(conversion: QualityReport, reports: dict[str, QualityReport], fallbacks: dict[str, str]) -> Table:
    out = Table(title="smollm2 (SmolLM2-135M-Instruct) per quant type, against its f16 GGUF", title_justify="left")
    columns = ("type", "size", "×f16", "bits/w", "ppl", "Δppl", "KL mean", "same top", "greedy", "fallback tensors", REF_COLUMN)
    for column in columns:
        out.add_column(column, justify="left" if column in ("type", "fallback tensors", REF_COLUMN) else "right")
    c = conversion
    out.add_row(
        "F16 vs HF fp32", f"{c.quantized.file_bytes / 2**20:.0f} MiB", f"{c.size_ratio:.3f}*", f"{c.quantized.bits_per_weight:.2f}",
        f"{c.quantized.perplexity:.3f}", f"{c.perplexity_change:+.2%}", f"{c.kl_mean:.5f}", f"{c.same_top_rate:.1%}",
        f"{c.greedy_token_agreement:.0%}", "-", "* vs the fp32 safetensors",
    )
    for qtype, r in reports.items():
        out.add_row(
            r.quantized.name, f"{r.quantized.file_bytes / 2**20:.0f} MiB", f"{r.size_ratio:.3f}", f"{r.quantized.bits_per_weight:.2f}",
            f"{r.quantized.perplexity:.3f}", f"{r.perplexity_change:+.2%}", f"{r.kl_mean:.5f}", f"{r.same_top_rate:.1%}",
            f"{r.greedy_token_agreement:.0%}", fallbacks.get(qtype, ""), _reference(qtype),
        )
    return out


def _reference(qtype: str) -> str:
    rows = REFERENCE.get(qtype)
    if not rows:
        return ""
    l3, l2 = rows["Llama-3-8B"], rows["Llama-2-7B"]
    return f"{l3['ppl_change']:+.2%} ×{l3['size_ratio']:.3f} | {l2['ppl_change']:+.2%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0", help="Comma-separated quant types.")
    parser.add_argument("--prompts", type=int, default=4, help="Chat prompts for greedy agreement.")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="Greedy tokens per prompt.")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the cores not busy).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every report as JSON here.")
    args = parser.parse_args()
    console = Console(stderr=True)
    settings = ReportSettings(prompts=args.prompts, greedy_tokens=args.greedy_tokens, n_threads=args.threads)
    started = time.perf_counter()
    conversion, reports, fallbacks = measure(args.types.split(","), settings, console)
    Console(width=200).print(table(conversion, reports, fallbacks))
    console.print(f"[dim]{conversion.scored_tokens} held-out tokens, windows of {conversion.window}; {time.perf_counter() - started:.0f}s[/dim]")
    if args.json:
        types = {t: {**r.to_dict(), "fallbacks": fallbacks[t]} for t, r in reports.items()}
        payload = {"conversion": conversion.to_dict(), "types": types, "reference": REFERENCE}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
