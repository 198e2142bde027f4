"""What ``tandem quantize`` does beyond one type: a ladder of types, an alignment run folder as MODEL
(its adapter merged first, its data as calibration text) and the alignment-retained check.

The work is the quantize package's (:mod:`tandemlm.quantize.ladder`) and align's
(:mod:`tandemlm.align.retained`); this module only joins them, which neither may do itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from tandemlm.cli.options import fail


@dataclass(frozen=True)
class RunModel:
    """An alignment run folder given as MODEL: what to quantize."""

    folder: Path
    base: Path
    adapter: Path | None


def run_model(model: str) -> RunModel | None:
    """The run behind ``model`` when it is an alignment run folder, else None."""
    from tandemlm.align.run_folder import is_run_folder, read_run_folder

    if not is_run_folder(model):
        return None
    run = read_run_folder(model)
    if not run.final.is_dir():
        fail(f"{run.dir} has no final/ model yet: quantize a finished run")
    if run.is_adapter:
        return RunModel(run.dir, run.base_model, run.final)
    return RunModel(run.dir, run.final, None)


def run_calibration(spec: str) -> Any:
    """``--calibration RUN``: the run's training prompts and chosen answers as one text, else None."""
    from tandemlm.align.data import load_rows
    from tandemlm.align.registry import open_run
    from tandemlm.align.run_folder import is_run_folder
    from tandemlm.quantize.texts import Text

    if spec == "builtin" or not is_run_folder(spec):
        return None
    run = open_run(spec)
    rows, _, path = load_rows(run.config.dataset, "eval", keep_extra=True)
    parts = []
    for row in rows:
        for key in ("prompt", "chosen", "completion"):
            value = row.get(key)
            if isinstance(value, str):
                parts.append(value)
            elif isinstance(value, list):
                parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return Text(f"run {run.dir.name}: {path.name} (prompts and chosen answers)", "\n\n".join(parts))


def ladder(base: Any, type_list: str, out_dir: Path, max_kld: float | None) -> tuple[list[Any], Any]:
    """Quantizes and reports each type of ``type_list`` (``q8_0,q4_k_m``), prints the table (and the budget's
    pick), writes JSON and plot; returns the results and the pick's (None without one)."""
    from rich.console import Console

    from tandemlm.quantize.ladder import (
        budget_line,
        ladder_cards,
        ladder_table,
        parse_types,
        run_ladder,
        smallest_within,
        write_ladder,
    )

    results = run_ladder(base, parse_types(type_list), out_dir)
    cards = ladder_cards(results)
    chosen = smallest_within(cards, max_kld) if max_kld is not None else None
    console = Console()
    console.print(ladder_table(cards, chosen))
    if max_kld is not None:
        console.print(budget_line(cards, max_kld))
    json_path, plot_path = out_dir / "ladder.json", out_dir / "ladder.png"
    write_ladder(cards, json_path, plot_path, max_kld)
    typer.secho(f"ladder written to {json_path} and {plot_path}", err=True)
    return results, next((r for r, card in zip(results, cards, strict=True) if card is chosen), None)


def check_retained(run: RunModel, results: list[Any], datasets: list[str], prompts: int | None, threads: int | None) -> None:
    """Runs the run's own measures on the unquantized merge and each quantized file; prints and saves them."""
    import json

    from rich.console import Console

    from tandemlm.align.retained import retained, retained_table
    from tandemlm.storage.atomic import atomic_write_text

    first = results[0]
    if first.intermediate is None:
        fail("--eval needs the unquantized GGUF of the merged policy, which this run did not keep")
    policies = {f"unquantized ({first.intermediate.stem.removeprefix('intermediate-').upper()})": first.intermediate}
    policies |= {_label(result) + (" +imatrix" if result.imatrix else ""): result.path for result in results}
    console = Console(stderr=True)
    with console.status("alignment retained") as status:
        report = retained(run.folder, policies, datasets or None, prompts, n_threads=threads,
                          status=lambda message: status.update(f"alignment retained: {message}"))
    report["files"] = {label: str(path) for label, path in policies.items()}
    Console().print(retained_table(report))
    out = results[0].path.parent / "retained.json"
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    typer.secho(f"alignment-retained report written to {out}", err=True)


def _label(result: Any) -> str:
    """A result's name in tables: its quant type, or the mixed file's own label."""
    return result.label if hasattr(result, "label") else result.qtype.label
