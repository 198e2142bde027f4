"""``tandem align compare``: run folders read into one row each, checked against numbers worked by hand,
the two-panel figure, the CLI, and the shipped demo run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tandemlm
from tandemlm.align.compare import (
    HEADERS,
    MISSING,
    compare_figure,
    frontier_series,
    read_row,
    read_rows,
    samples_per_step,
    table_rows,
    write_figure,
)
from tandemlm.align.errors import ConfigError
from tandemlm.cli.main import app

DEMO_RUN = Path(tandemlm.__file__).parent / "data" / "demo_runs" / "ppo_capitals"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _write_run(folder: Path, method: str, records: list[dict[str, Any]], config: dict[str, Any],
               info: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None) -> Path:
    """A run folder shaped like the demo run's: config.yaml, run.json, metrics.jsonl, eval.json if given."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in {"method": method, **config}.items()))
    session = {"started": "2026-12-01T10:00:00", "resumed_from": None, "finished": "2026-12-01T10:10:00", "seconds": 600.0}
    run_json = {"method": method, "model": "smollm2", "base_model": "/models/base", "adapter": True, "status": "finished",
                "sessions": [session], "wall_time_s": 600.0, "global_step": len(records), **(info or {})}
    (folder / "run.json").write_text(json.dumps(run_json, indent=2))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


def _eval(policy: float, reference: float, kl: float, win: float) -> dict[str, Any]:
    return {"method": "grpo", "policy": {"verifier_accuracy": policy}, "reference": {"verifier_accuracy": reference},
            "kl": {"per_response": kl * 10, "per_token": kl, "note": None},
            "win_rate": {"verifier": {"wins": 1, "ties": 1, "losses": 1, "win_rate": win}}}


def _grpo_records(scores: list[float], kls: list[float]) -> list[dict[str, Any]]:
    """The critic-free trainer's rows: `samples` logged cumulatively, 48 a step where the batch is 32 (16 × 2
    processes): re-sampled groups count too, so the logged count must win over steps × batch."""
    util, clip, dropped, peak = [0.5, 0.75, 1.0, 0.25], [0.1, 0.2, 0.3, 0.0], [1, 0, 2, 1], [1000.0, 1200.0, 1100.0, 1150.0]
    return [
        {"step": i + 1, "score": scores[i], "kl": kls[i], "samples": 48 * (i + 1), "response_utilization": util[i],
         "clipfrac": clip[i], "groups_dropped": dropped[i], "peak_memory_mb": peak[i]}
        for i in range(4)
    ] + [{"step": 4, "warning": "response length rose while the score stayed flat"}]


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Two GRPO runs at two settings (the wider-KL one given first) and an older PPO run without eval.json."""
    grpo_config = {"batch_size": 16, "grad_accum": 1, "num_generations": 8}
    wide = _write_run(tmp_path / "grpo-beta0", "grpo", _grpo_records([0.1, 0.2, 0.4, 0.6], [0.01, 0.05, 0.1, 0.2]),
                      grpo_config, info={"world_size": 2}, evaluation=_eval(0.6, 0.25, 0.3, 0.7))
    tight = _write_run(tmp_path / "grpo-beta1", "grpo", _grpo_records([0.1, 0.2, 0.3, 0.3], [0.01, 0.02, 0.03, 0.04]),
                       grpo_config, info={"world_size": 2}, evaluation=_eval(0.5, 0.25, 0.1, 0.6))
    old_ppo = [{"step": s, "score": 0.25 * s, "kl": 0.01 * s, "clipfrac": 0.1, "peak_memory_mb": 900.0 + s} for s in (1, 2, 3)]
    # Two ranks' digests: finish_run records them for a two-process run, and run.json has no other process count.
    ppo = _write_run(tmp_path / "ppo-old", "ppo", old_ppo, {"batch_size": 16, "grad_accum": 2},
                     info={"rank_digests": ["abc", "abc"], "wall_time_s": 95.5})
    return [wide, tight, ppo]


def test_rows_match_numbers_worked_by_hand(runs):
    wide, tight, ppo = read_rows(runs)
    assert (wide.name, wide.method, wide.steps) == ("grpo-beta0", "grpo", 4)
    assert wide.samples == 192 and not wide.samples_derived  # the last row's `samples`, as logged
    assert wide.train_score == pytest.approx((0.2 + 0.4 + 0.6) / 3)  # the last 3 scores
    assert wide.train_kl == 0.2  # the last kl
    assert wide.response_utilization == pytest.approx((0.5 + 0.75 + 1.0 + 0.25) / 4)
    assert wide.clipfrac == pytest.approx((0.1 + 0.2 + 0.3 + 0.0) / 4)
    assert (wide.groups_dropped, wide.peak_memory_mb, wide.wall_time_s) == (4, 1200.0, 600.0)
    assert wide.eval_gain_points == pytest.approx(100 * (0.6 - 0.25))  # 35 points
    assert (wide.eval_kl_per_token, wide.win_rate, wide.win_rate_judge) == (0.3, 0.7, "verifier")
    assert tight.eval_gain_points == pytest.approx(25.0) and tight.train_score == pytest.approx((0.2 + 0.3 + 0.3) / 3)
    # The old PPO run logged no samples: 3 steps × 16 prompts × 1 response × 2 processes (grad_accum splits, never adds).
    assert ppo.samples == 3 * 16 * 2 and ppo.samples_derived
    assert ppo.curve == [(32.0, 0.25), (64.0, 0.5), (96.0, 0.75)]
    assert (ppo.response_utilization, ppo.groups_dropped, ppo.eval_gain_points, ppo.win_rate) == (None, None, None, None)
    assert ppo.wall_time_s == 95.5 and ppo.peak_memory_mb == 903.0


def test_the_table_marks_derived_samples_and_shows_missing_pieces_as_a_dash(runs):
    cells = [dict(zip(HEADERS, row, strict=True)) for row in table_rows(read_rows(runs))]
    assert cells[0]["samples"] == "192" and cells[2]["samples"] == "96*"
    assert (cells[0]["gain (pts)"], cells[0]["eval acc"], cells[0]["ref acc"], cells[0]["win-rate"]) == ("+35.0", "60.0%", "25.0%", "70.0%")
    assert cells[0]["groups dropped"] == "4" and cells[0]["train score"] == "0.400"
    assert all(cells[2][h] == MISSING for h in ("resp. util.", "groups dropped", "eval acc", "gain (pts)", "eval KL/tok", "win-rate"))


def test_samples_per_step_counts_prompts_for_ppo_and_completions_for_the_critic_free_methods():
    assert samples_per_step("ppo", {"batch_size": 16, "grad_accum": 4}, 2) == 32
    # our critic-free trainer (minibatch_size in its config): grad_accum splits the batch, never adds to it
    assert samples_per_step("dapo", {"batch_size": 8, "grad_accum": 2, "minibatch_size": None}, 2) == 16
    assert samples_per_step("grpo", {"batch_size": 8, "grad_accum": 2}, 2) == 32  # TRL's GRPO generated per micro-batch
    assert samples_per_step("dpo", {"batch_size": 8}) is None and samples_per_step("ppo", {}) is None


def test_damaged_files_read_as_missing_never_raise(tmp_path):
    run = _write_run(tmp_path / "grpo-broken", "grpo", [], {"batch_size": 8})
    (run / "eval.json").write_text("{not json")
    (run / "metrics.jsonl").write_text('{"step": 1, "score": "high", "kl": NaN}\n{"step": 2, "sc')
    (run / "config.yaml").write_text("batch_size: [8\n")
    row = read_row(run)
    assert (row.train_score, row.train_kl, row.samples, row.eval_gain_points) == (None, None, None, None)
    assert row.steps == 1 and row.method == "grpo"


def test_a_folder_that_is_not_a_run_is_named_in_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"notes is not a run folder \(run.json or config.yaml is missing\)"):
        read_rows([tmp_path / "notes"])


def test_the_frontier_joins_a_methods_runs_in_kl_order(runs):
    series = frontier_series(read_rows(runs))
    grpo = series["grpo"]
    assert [(p.run, p.kl, p.value) for p in grpo] == [("grpo-beta1", 0.1, pytest.approx(25.0)), ("grpo-beta0", 0.3, pytest.approx(35.0))]
    (ppo,) = series["ppo (train)"]  # no eval.json: final train score against the last train KL
    assert (ppo.kl, ppo.value, ppo.basis) == (0.03, pytest.approx(0.5), "train")


def test_the_figure_is_a_png_with_both_panels(runs, tmp_path):
    import matplotlib.pyplot as plt

    rows = read_rows(runs)
    out = write_figure(rows, tmp_path / "figs" / "compare.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and not list(out.parent.glob("*.partial"))
    fig = compare_figure(rows)
    curves, frontier = fig.axes
    assert [line.get_label() for line in curves.get_lines()] == ["grpo-beta0", "grpo-beta1", "ppo-old"]
    assert list(curves.get_lines()[0].get_xdata()) == [48, 96, 144, 192]  # x is samples as logged, not steps
    grpo_line = next(line for line in frontier.get_lines() if line.get_label() == "grpo")
    assert list(grpo_line.get_xdata()) == [0.1, 0.3]
    assert "frontier" in frontier.get_title() and "samples" in curves.get_xlabel()
    plt.close(fig)


def test_cli_prints_the_table_writes_the_figure_and_the_rows(runs, tmp_path):
    out, rows_file = tmp_path / "cmp.png", tmp_path / "rows.json"
    args = ["align", "compare", *map(str, runs), "--out", str(out), "--json", str(rows_file)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "grpo-beta0" in result.output and "+35.0" in result.output and "96*" in result.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads(rows_file.read_text())
    assert [r["name"] for r in saved] == ["grpo-beta0", "grpo-beta1", "ppo-old"]
    assert saved[2]["samples"] == 96 and saved[2]["samples_derived"] and saved[2]["eval_gain_points"] is None


def test_cli_names_a_folder_that_is_not_a_run_and_exits_2(runs, tmp_path):
    (tmp_path / "notes").mkdir()
    result = runner.invoke(app, ["align", "compare", str(runs[0]), str(tmp_path / "notes"), "--out", str(tmp_path / "c.png")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "notes is not a run folder" in lines[0]
    assert not (tmp_path / "c.png").exists()  # nothing half done


def test_the_shipped_demo_run_reads_with_its_recorded_gain_and_kl():
    row = read_row(DEMO_RUN)
    assert row.method == "ppo" and round(row.eval_gain_points, 1) == 28.3 and round(row.eval_kl_per_token, 3) == 0.156
    assert row.samples == 30 * 16 and row.samples_derived  # 30 steps × 16 prompts, as the README says
    assert row.wall_time_s == 1059.3
    cells = dict(zip(HEADERS, table_rows([row])[0], strict=True))
    assert (cells["gain (pts)"], cells["eval KL/tok"], cells["samples"]) == ("+28.3", "0.156", "480*")
