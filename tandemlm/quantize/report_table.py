"""The quality report as a rich table: one row per measure, a column per model and one for the change."""

from __future__ import annotations

from typing import Any


def report_table(report: Any) -> Any:
    """The printed form of ``report``, a ``report.QualityReport`` (not imported: report imports this module)."""
    from rich.table import Table

    o, q, kld = report.original, report.quantized, report.kld
    table = Table(title=f"{q.name} vs {o.name}", title_justify="left", caption=f"text: {report.text}", caption_justify="left")
    table.add_column("measure")
    table.add_column(o.name, justify="right")
    table.add_column(q.name, justify="right")
    table.add_column("change", justify="right")
    table.add_row("type", o.qtype, q.qtype, "")
    table.add_row("file size", _mib(o.file_bytes), _mib(q.file_bytes), f"×{report.size_ratio:.3f}")
    table.add_row("bits/weight", f"{o.bits_per_weight:.2f}", f"{q.bits_per_weight:.2f}", "")
    table.add_row(
        f"perplexity ({report.scored_tokens} tokens)", f"{o.perplexity:.4f}", f"{q.perplexity:.4f}",
        f"×{report.ppl_ratio:.4f} ({report.perplexity_change:+.2%})",
    )
    table.add_row("KLD mean / median (nats)", "", f"{kld.mean:.5f} / {kld.median:.5f}", "")
    table.add_row("KLD p99 / p99.9 / max", "", f"{kld.p99:.4f} / {kld.p999:.4f} / {kld.max:.4f}", "")
    table.add_row("RMS Δp (correct token)", "", f"{report.delta_p_rms:.3%}", "")
    table.add_row("same top token", "", f"{report.same_top_rate:.2%}", "")
    if report.greedy_prompts:
        table.add_row(
            f"greedy agreement ({report.greedy_prompts} prompts × {report.greedy_tokens} tokens)",
            "", f"{report.greedy_token_agreement:.2%} tokens, {report.greedy_exact_rate:.0%} exact", "",
        )
    table.add_row("pp512 tok/s (llama-bench)", _speed(o.pp_tok_s), _speed(q.pp_tok_s), _times(q.pp_tok_s, o.pp_tok_s))
    table.add_row("tg128 tok/s (llama-bench)", _speed(o.tg_tok_s), _speed(q.tg_tok_s), _times(q.tg_tok_s, o.tg_tok_s))
    table.add_row("importance matrix", "", report.imatrix or "none recorded", "")
    identical = _yes(report.template_identical) + " / " + _yes(report.prompt_tokens_identical)
    table.add_row("chat template / prompt tokens", "", identical, "")
    return table


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _speed(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _times(new: float | None, old: float | None) -> str:
    return "" if new is None or not old else f"×{new / old:.2f}"


def _yes(value: bool) -> str:
    return "identical" if value else "DIFFERENT"
