"""``bench/serve_load.py`` runs on a fresh ``setup.sh --dev``: the llama_cpp.server baseline's extra is in ``[dev]``."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_dev_extra_covers_llama_cpp_pythons_server_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    server_extra = {_name(r) for r in requires("llama-cpp-python") or [] if re.search(r"extra\s*==\s*.server.", r)}
    assert server_extra, "llama-cpp-python lists no [server] extra any more"
    assert server_extra <= ours, f"missing from [dev]: {sorted(server_extra - ours)}"


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "bench" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_repeated_runs_report_each_metrics_median_leaving_nans_out() -> None:
    runs = [{8: {"tokens_per_s": v, "cpu_per_token": c}} for v, c in ((100.0, math.nan), (90.0, 0.5), (130.0, 0.7))]
    assert _bench().median_by_level(runs) == {8: {"tokens_per_s": 100.0, "cpu_per_token": 0.6}}
    assert math.isnan(_bench().median_by_level([{16: {"ttft_p95": math.nan}}])[16]["ttft_p95"])


def test_bench_prints_a_one_line_hint_when_the_server_extra_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette_context" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["serve_load.py"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    message = str(exit_info.value.code)
    assert "\n" not in message and "starlette-context" in message and "pip install" in message
