"""A pytest plugin: under ``CI=true`` a skip for anything but a missing GPU fails the run.

CI must not go green by skipping what it was meant to test (a missing vLLM, Chromium or llama.cpp
converter is a broken set-up there, not a reason to skip). Only "needs a CUDA GPU" may skip: CI has no GPU.
A module that skips at import (``pytest.importorskip``) fails its collection.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

GPU_SKIP = "CUDA GPU"  # the one skip reason CI allows: "needs a CUDA GPU" (gpu-marked tests and their kin)


def _skip_refused_in_ci(report: Any) -> None:
    """Under ``CI=true`` a skip for anything but a missing GPU (vLLM, Chromium, a converter...) fails the run."""
    if os.environ.get("CI", "").lower() != "true" or not report.skipped:
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if GPU_SKIP not in reason:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where only a missing GPU may skip a test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    _skip_refused_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    _skip_refused_in_ci(outcome.get_result())  # a module-level importorskip
