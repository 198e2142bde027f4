"""Our KL divergence, Δp and perplexity against llama.cpp's own ``llama-perplexity --kl-divergence``.

    .venv/bin/python bench/quantize_kld_check.py [--original F16.gguf --quantized Q.gguf] [--ctx 512] [--chunks 16]
                                                 [--threads N] [--text FILE] [--json out.json]

Without ``--original``/``--quantized`` the pair is the built-in model's: the f16 intermediate and the Q4_K_M
that ``tandem quantize smollm2 --type q4_k_m --imatrix none`` makes (cached by content). The text is the
report's (``report.evaluation_text``: the built-in evaluation text, or ``--text``).

llama-perplexity scores differently from the report: it cuts the tokenized text (with a BOS in front)
into ``--chunks`` chunks of ``-c`` tokens, puts a BOS over each chunk's first token (for models that add
one; SmolLM2 does not), and scores only the
second half of each chunk (positions c/2 .. c-2, so every scored token has at least c/2 tokens of
context); its ``--kl-divergence-base`` file keeps the original's log-probabilities rounded to 16 bits, and
its KL sum skips tokens whose original log-probability is below -16. To compare like with like, the
middle column runs tandem's own scorer and statistics (``scoring.GGUFScorer``, ``metrics.Agreement``,
``reference.LogitStore``) on exactly those chunks (the token ids are read back from llama-perplexity's
base file) and exactly those positions, with the same context, batch, threads, f32 KV cache and flash
attention off on both sides. The last column is tandem's report as users get it (every position of
windows of ``--ctx`` tokens, 1 to ctx-1 tokens of context), for reference only. A last line repeats
tandem's mean KLD with llama.cpp's cutoff applied, which shows where the two differ.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tandemlm.llamacpp.programs import llamacpp_binary
from tandemlm.quantize.logit_scorers import GGUFScorer, default_threads
from tandemlm.quantize.reference import LogitStore
from tandemlm.quantize.report import ReportSettings, compare_models, evaluation_text
from tandemlm.quantize.report_maths import Agreement, log_softmax, ratio

# (our name, the label llama-perplexity prints, scale to our units): Δp and same top p are printed in %.
CUTOFF = -16.0  # llama-perplexity's KL sum skips tokens whose original log-probability is not above this
MEASURES: tuple[tuple[str, str, float], ...] = (
    ("ppl_original", r"Mean PPL\(base\)\s*", 1.0),
    ("ppl", r"Mean PPL\(Q\)\s*", 1.0),
    ("ppl_ratio", r"Mean PPL\(Q\)/PPL\(base\)\s*", 1.0),
    ("kld_mean", r"Mean\s+KLD", 1.0),
    ("kld_median", r"Median\s+KLD", 1.0),
    ("kld_p99", r"99\.0%\s+KLD", 1.0),
    ("kld_p999", r"99\.9%\s+KLD", 1.0),
    ("kld_max", r"Maximum KLD", 1.0),
    ("delta_p_rms", r"RMS Δp\s*", 0.01),
    ("same_top_p", r"Same top p", 0.01),
)


def parse_perplexity_output(text: str) -> dict[str, float]:
    """The final statistics llama-perplexity --kl-divergence prints, in the report's units."""
    found = {}
    for name, label, scale in MEASURES:
        match = re.search(rf"^{label}:\s*(-?[\d.]+)", text, re.MULTILINE)
        if match is None:
            raise SystemExit(f"llama-perplexity printed no '{label}' line:\n{text[-2000:]}")
        found[name] = float(match.group(1)) * scale
    return found


def run_llama_perplexity(original: Path, quantized: Path, text_file: Path, base: Path, args: argparse.Namespace) -> dict[str, float]:
    """llama-perplexity twice: the original's log-probs into ``base``, then the quantized model against them."""
    binary = llamacpp_binary("llama-perplexity")
    common = ["-c", str(args.ctx), "-b", str(args.ctx), "-ub", str(args.ctx), "-t", str(args.threads),
              "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    steps = (
        [str(binary), "-m", str(original), "-f", str(text_file), "--chunks", str(args.chunks), "--kl-divergence-base", str(base), *common],
        [str(binary), "-m", str(quantized), "--kl-divergence-base", str(base), "--kl-divergence", *common],
    )
    for command in steps:
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return parse_perplexity_output(done.stdout + done.stderr)


def base_file_chunks(base: Path) -> list[list[int]]:
    """The token ids llama-perplexity scored, chunk by chunk, from its base file's header."""
    with base.open("rb") as handle:
        if handle.read(8) != b"_logits_":
            raise SystemExit(f"{base} is not a llama-perplexity base file")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<Iii", handle.read(12))
        tokens = np.frombuffer(handle.read(4 * n_ctx * n_chunk), dtype=np.int32).tolist()
    return [tokens[i * n_ctx : (i + 1) * n_ctx] for i in range(n_chunk)]


def ours_on_llamas_positions(original: Path, quantized: Path, chunks: list[list[int]], args: argparse.Namespace) -> dict[str, float]:
    """tandem's scorer and statistics on llama-perplexity's chunks, scoring only its positions (c/2 .. c-2)."""
    first, end = args.ctx // 2, args.ctx - 1
    store = LogitStore(rows=len(chunks) * (end - first))
    agreement, cut = Agreement(), []
    try:
        scorer = GGUFScorer(original, n_ctx=args.ctx, n_threads=args.threads)
        try:
            bos = scorer.bos_id()
            spans = [[bos, *chunk[1:]] if bos is not None else chunk for chunk in chunks]  # BOS over token 0, as llama.cpp
            for span in spans:
                store.append(scorer.logits(span)[first:end])
        finally:
            scorer.close()
        scorer = GGUFScorer(quantized, n_ctx=args.ctx, n_threads=args.threads)
        try:
            for i, span in enumerate(spans):
                rows = scorer.logits(span)[first:end]
                agreement.add_window(store.window(i), rows, span[first:])
                cut += kl_with_cutoff(store.window(i), rows)
        finally:
            scorer.close()
    finally:
        store.close()
    kld = agreement.kld()
    return {
        "ppl_original": agreement.perplexity_original, "ppl": agreement.perplexity_quantized,
        "ppl_ratio": ratio(agreement.perplexity_quantized, agreement.perplexity_original), "kld_mean": kld.mean,
        "kld_median": kld.median, "kld_p99": kld.p99, "kld_p999": kld.p999, "kld_max": kld.max,
        "delta_p_rms": agreement.delta_p_rms, "same_top_p": agreement.same_top_rate, "positions": agreement.positions,
        "kld_mean_cutoff": float(np.mean(cut)),
    }


def kl_with_cutoff(original: np.ndarray, quantized: np.ndarray) -> list[float]:
    """Per-position KL(original ‖ quantized) over only the tokens llama-perplexity sums (log p > -16)."""
    log_p, log_q = log_softmax(original), log_softmax(quantized)
    terms = np.exp(log_p) * (log_p - log_q)
    return np.where(log_p > CUTOFF, terms, 0.0).sum(axis=-1).tolist()


def default_pair() -> tuple[Path, Path]:
    """The built-in model's f16 intermediate and its Q4_K_M without an importance matrix."""
    from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model

    result = quantize_model(QuantizeConfig(model="smollm2", qtype="q4_k_m", imatrix="none", publish=False))
    assert result.intermediate is not None
    return result.intermediate, result.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", type=Path)
    parser.add_argument("--quantized", type=Path)
    parser.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c, and the report's window")
    parser.add_argument("--chunks", type=int, default=16, help="chunks of --ctx tokens (16 × 512 = the report's 8192)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.threads = args.threads or default_threads()
    original, quantized = (args.original, args.quantized) if args.original and args.quantized else default_pair()
    text = evaluation_text(args.text)
    print(f"original {original}\nquantized {quantized}\ntext {text.name}\nthreads {args.threads}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kld-check.") as tmp:
        text_file, base = Path(tmp) / "text.txt", Path(tmp) / "base.kld"
        text_file.write_text(text.content, encoding="utf-8")
        theirs = run_llama_perplexity(original, quantized, text_file, base, args)
        ours = ours_on_llamas_positions(original, quantized, base_file_chunks(base), args)
    settings = ReportSettings(window=args.ctx, max_text_tokens=args.ctx * args.chunks, prompts=0, text=args.text,
                              n_threads=args.threads, bench=False)
    report = compare_models(original, quantized, settings)
    card = {**report.card(), "ppl_original": report.original.perplexity}
    print_table(theirs, ours, card)
    if args.json:
        args.json.write_text(json.dumps({"llama_perplexity": theirs, "tandem_same_positions": ours, "tandem_report": card}, indent=2))


def print_table(theirs: dict[str, float], ours: dict[str, float], card: dict[str, float]) -> None:
    """Markdown: llama.cpp, ours on its positions, their ratio, and the report's own figure."""
    print(f"\nscored positions: llama-perplexity and tandem on the same positions {ours['positions']}")
    print("\n| measure | llama-perplexity | tandem, same positions | tandem / llama.cpp | tandem report (all positions) |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _ in MEASURES:
        share = ours[name] / theirs[name] if theirs[name] else float("nan")
        print(f"| {name} | {theirs[name]:.6f} | {ours[name]:.6f} | {share:.4f} | {card[name]:.6f} |")
    cut = ours["kld_mean_cutoff"]
    print(f"\ntandem's kld_mean summing only tokens with log p_original > {CUTOFF:g}, as llama-perplexity does: "
          f"{cut:.6f} ({cut / theirs['kld_mean']:.4f} × llama.cpp's)")


if __name__ == "__main__":
    main()
