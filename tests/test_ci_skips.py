"""The CI skip policy (tests/ci_skips.py), run on a throw-away test file in a pytest of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = '''
import pytest

def test_needs_a_browser():
    pytest.skip("needs Debian's chromium")

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")
'''


def _pytest(folder: Path, ci: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider", "-rs", str(folder)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=folder)


def test_under_ci_only_a_missing_gpu_may_skip(tmp_path):
    (tmp_path / "test_sample.py").write_text(TESTS)
    (tmp_path / "test_module.py").write_text("import pytest\npytest.importorskip('no_such_module_here')\n")
    ci = _pytest(tmp_path, "true")
    assert ci.returncode != 0  # the module-level skip fails its collection, which stops the run
    assert "skipped under CI=true, where only a missing GPU may skip a test" in ci.stdout
    assert "could not import 'no_such_module_here'" in ci.stdout
    (tmp_path / "test_module.py").unlink()
    ci = _pytest(tmp_path, "true")
    assert "skipped under CI=true, where only a missing GPU may skip a test: Skipped: needs Debian's chromium" in ci.stdout
    assert "1 failed, 1 skipped" in ci.stdout and "needs a CUDA GPU" in ci.stdout
    local = _pytest(tmp_path, "")
    assert local.returncode == 0 and "2 skipped" in local.stdout
