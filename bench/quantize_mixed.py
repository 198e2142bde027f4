"""Mixed precision per tensor (``--target-bpw``) against llama.cpp's uniform types on the built-in model.

    .venv/bin/python bench/quantize_mixed.py [--targets iq4_nl,q4_1,q5_1] [--uniform q8_0,...] [--tokens 8192] [--json FILE]

Every file is made from the same f16 GGUF with the same importance matrix (``--imatrix auto``:
llama-imatrix on the built-in calibration text): through the pipeline, cached by content, or (q5_1,
q5_0, q4_1, which ``tandem quantize --type`` does not list) by the same quantizer call. A target is
a number of bits per weight, or a uniform type's name: the mix is then made no larger than that
type's file. Each file is scored against the f16 GGUF on the evaluation text (never calibrated on;
the report's windows and KL sums, the original scored once): mean and 99th-percentile KL divergence,
same top token. For each mix, the uniform files of the same or larger size are named with the
verdict: it wins where its mean KLD is lower. The mix's KLD on the calibration slice as the ΔKLDs
predict it (all-q8_0 KLD + the sum of its groups' ΔKLD) is set beside the measured one: the search
(``--search`` moves, default 8) picks the plan by that measured number, never by the prediction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.imatrix import choose_imatrix, prepare_imatrix
from tandemlm.quantize.mixed import MixedResult, quantize_model_mixed
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model
from tandemlm.quantize.quant_types import QUANT_TYPES
from tandemlm.quantize.quantizer import quantize_gguf
from tandemlm.quantize.sensitivity import KLProbe, ProbeSettings, type_row
from tandemlm.quantize.texts import builtin_calibration, builtin_evaluation

UNIFORM = "q8_0,q6_k,q5_k_m,q5_1,q5_0,q4_1,q4_k_m,iq4_nl,q4_0"


@dataclass
class Row:
    """One file as measured."""

    name: str
    path: Path
    file_bytes: int
    bpw: float
    kld_mean: float = 0.0
    kld_p99: float = 0.0
    same_top: float = 0.0
    mixed: MixedResult | None = None
    calibration_kld: float | None = None  # measured on the calibration slice (mixes only)


def make_files(uniform: list[str], targets: list[str], folder: Path, console: Console, search: int = 8) -> tuple[Path, list[Row], list[Row]]:
    """(the f16 GGUF, uniform rows, mixed rows): the mixes and the types tandem lists through the pipeline
    (cached); q5_1, q5_0 and q4_1, which it does not list, by the same quantizer call and importance matrix."""
    base = quantize_model(QuantizeConfig(model="smollm2", qtype="q8_0", publish=False), console)
    assert base.intermediate is not None
    intermediate, entry = base.intermediate, base.path.parent
    imatrix = prepare_imatrix(choose_imatrix("auto", builtin_calibration()), intermediate, entry, None)
    rows = []
    for qtype in uniform:
        if qtype in QUANT_TYPES:
            path = quantize_model(QuantizeConfig(model="smollm2", qtype=qtype, publish=False), console).path
        else:
            path = folder / f"{qtype}.gguf"
            with console.status(f"quantizing {qtype} (llama.cpp's LLAMA_FTYPE_MOSTLY_{qtype.upper()})"):
                quantize_gguf(intermediate, path, type_row(qtype), imatrix=imatrix)
        info = read_gguf_info(path)
        rows.append(Row(qtype.upper(), path, info.file_size, info.bits_per_weight))
    sizes = {row.name.lower(): row.bpw for row in rows}
    mixes = []
    for target in targets:
        bpw = sizes[target.lower()] if target.lower() in sizes else float(target)
        config = QuantizeConfig(model="smollm2", qtype="q8_0", out=folder / f"mix-{target}.gguf")
        result = quantize_model_mixed(config, bpw, ProbeSettings(search=search), console)
        label = f"mix ≤ {target.upper()}" if target.lower() in sizes else f"mix {bpw:g}"
        mixes.append(Row(label, result.path, result.file_bytes, result.bits_per_weight, mixed=result))
    return intermediate, rows, mixes


def score(intermediate: Path, rows: list[Row], tokens: int, console: Console) -> None:
    """Evaluation-text KLD of every row; calibration-slice KLD of the mixes."""
    with console.status("scoring the f16 GGUF on the evaluation text"):
        probe = KLProbe(intermediate, builtin_evaluation(), tokens, 512, None)
    try:
        for row in rows:
            with console.status(f"scoring {row.name} on the evaluation text"):
                found = probe.agreement(row.path)
            kld = found.kld()
            row.kld_mean, row.kld_p99, row.same_top = kld.mean, kld.p99, found.same_top_rate
    finally:
        probe.close()
    mixes = [row for row in rows if row.mixed is not None]
    if mixes:
        slice_ = ProbeSettings()
        with console.status("scoring the f16 GGUF on the calibration slice"):
            calibration = KLProbe(intermediate, builtin_calibration(), slice_.tokens, slice_.window, None)
        try:
            for row in mixes:
                row.calibration_kld = calibration.agreement(row.path).kl_mean
        finally:
            calibration.close()


def verdict(mix: Row, uniform: list[Row]) -> str:
    """The uniform files no smaller than the mix (by size), split by whether the mix has the lower mean KLD."""
    larger = sorted((row for row in uniform if row.file_bytes >= mix.file_bytes), key=lambda row: row.file_bytes)
    beaten = [row.name for row in larger if mix.kld_mean < row.kld_mean]
    not_beaten = [row.name for row in larger if mix.kld_mean >= row.kld_mean]
    return f"beats {', '.join(beaten) or 'none'}; not {', '.join(not_beaten) or 'one'}"


def table(uniform: list[Row], mixes: list[Row]) -> list[str]:
    """Every file by size as markdown rows, with the mixes' calibration KLD (predicted / measured) and verdicts."""
    lines = [
        "| file | MiB | bits/w | KLD mean | KLD p99 | same top | calib KLD pred / meas | vs uniform files ≥ its size (mean KLD) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(uniform + mixes, key=lambda row: row.file_bytes):
        calibration, against, name = "", "", row.name
        if row.mixed is not None:
            calibration = f"{row.mixed.plan.predicted_kld:.5f} / {row.calibration_kld:.5f}"
            against, name = verdict(row, uniform), f"**{row.name}**"
        lines.append(f"| {name} | {row.file_bytes / 2**20:.1f} | {row.bpw:.3f} | {row.kld_mean:.5f} | {row.kld_p99:.4f} | "
                     f"{row.same_top:.1%} | {calibration} | {against} |")
    return lines


def mix_json(row: Row) -> dict[str, object]:
    """A mix's types and its search's trials (what, calibration KLD, kept) for the JSON; nothing for a uniform row."""
    if row.mixed is None:
        return {}
    search = row.mixed.plan.search
    trials = [[t.what, t.kld, t.kept] for t in search.trials] if search else None
    return {"types": row.mixed.plan.types, "search": trials}


def main() -> None:
    """Makes the files, scores them, prints the table and each mix's plan."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="iq4_nl,q4_1,q5_1", help="bits per weight, or uniform types to be no larger than")
    parser.add_argument("--uniform", default=UNIFORM, help="uniform types to compare with")
    parser.add_argument("--tokens", type=int, default=8192, help="evaluation tokens scored")
    parser.add_argument("--search", type=int, default=8, help="measured moves per mix after the knapsack (0: none)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="mixed-bench.") as folder:
        intermediate, uniform, mixes = make_files(args.uniform.split(","), args.targets.split(","), Path(folder), console, args.search)
        score(intermediate, uniform + mixes, args.tokens, console)
    if args.json:
        keys = ("name", "file_bytes", "bpw", "kld_mean", "kld_p99", "same_top", "calibration_kld")
        rows = [{**{k: getattr(row, k) for k in keys}, **mix_json(row)} for row in uniform + mixes]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(table(uniform, mixes)))
    for row in mixes:
        assert row.mixed is not None
        print(f"{row.name}: {row.mixed.plan.summary()}")
        for trial in row.mixed.plan.search.trials if row.mixed.plan.search else ():
            print(f"    {'kept' if trial.kept else '    '} {trial.kld:.5f}  {trial.what}")


if __name__ == "__main__":
    main()
