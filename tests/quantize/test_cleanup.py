"""``tandem quantize`` cleans up after itself: no orphaned converter, no temp files left for good.

The signal tests hold the converter child still with a ``sitecustomize`` that sleeps when the
converter script starts (put on the child's ``PYTHONPATH``): the run is then reliably in its
conversion stage when the signal comes, and a converter that outlived its parent would be seen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tandemlm.quantize.cache import quantize_cache_root, sweep_stale_temps, temp_folder
from tandemlm.quantize.pipeline import QuantizeConfig, quantize_model

HOLD_CONVERTER = """\
import sys, time
if sys.argv and sys.argv[0].endswith("convert_hf_to_gguf.py"):
    time.sleep(600)
"""
WAIT_S = 120  # generous bound for a loaded 2-core machine; only reached when something is wrong


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The PID of a process that lives through the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_run_sweeps_temp_files_of_dead_owners_and_keeps_live_ones(
    quantized, quant_cache, tiny_llama_dir, tmp_path, live_pid
):
    quantized("llama", "q8_0")  # the run below is then a cache hit: only the sweep is under test
    folder = temp_folder(quant_cache)
    dead = dead_pid()
    stale_file = folder / f"{dead}-intermediate-f16.gguf.abc123.partial"
    stale_file.write_bytes(b"GGUF half written")
    stale_dir = folder / f"{dead}-0123456789abcdef0123.xyz"
    (stale_dir / "intermediate-f16.gguf").parent.mkdir()
    (stale_dir / "intermediate-f16.gguf").write_bytes(b"GGUF")
    in_progress = folder / f"{live_pid}-Q8_0.gguf.def456.unverified"
    in_progress.write_bytes(b"GGUF still being written")
    not_ours = folder / "README"
    not_ours.write_text("no PID in the name")

    quantize_model(
        QuantizeConfig(model=str(tiny_llama_dir), qtype="q8_0", out=tmp_path / "q8.gguf", cache_root=quant_cache)
    )

    assert not stale_file.exists() and not stale_dir.exists()
    assert in_progress.is_file() and not_ours.is_file()
    in_progress.unlink()
    not_ours.unlink()


# ---------------------------------------------------------------------------------------------
# Signals during the conversion stage


def start_quantize(tiny_llama_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    """``tandem quantize`` (no cache, so it converts) and its converter child, once that has started."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_CONVERTER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out" / "tiny.gguf"
    command = [sys.executable, "-m", "tandemlm.cli.main", "quantize", str(tiny_llama_dir), "--type", "q8_0"]
    parent = subprocess.Popen(
        [*command, "--out", str(out), "--no-cache"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and parent.poll() is None:
        children = [
            c for c in psutil.Process(parent.pid).children() if "convert_hf_to_gguf.py" in " ".join(_cmdline(c))
        ]
        if children:
            return parent, children[0]
        time.sleep(0.1)
    parent.kill()
    output = parent.communicate()
    pytest.fail(f"the converter never started (exit {parent.returncode}): {output}")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def wait_gone(process: psutil.Process) -> bool:
    """True once ``process`` has exited (a zombie no one reaps counts as exited)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def owned_by(pid: int) -> list[Path]:
    return sorted(temp_folder(quantize_cache_root()).glob(f"{pid}-*"))


def test_sigterm_during_conversion_leaves_no_child_and_no_temp_file(tiny_llama_dir, tmp_path):
    parent, converter = start_quantize(tiny_llama_dir, tmp_path)
    assert owned_by(parent.pid)  # the converter's temp file, named by its owner
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=WAIT_S)
    try:
        assert parent.returncode == 128 + signal.SIGTERM
        assert "Traceback" not in stderr
        assert wait_gone(converter), "the converter outlived tandem quantize"
        assert owned_by(parent.pid) == []
        assert list((tmp_path / "out").glob("*")) == []  # no result, no hidden publish temp
    finally:
        _kill(converter)


def test_kill_9_of_tandem_kills_the_converter_and_the_next_run_sweeps_its_files(tiny_llama_dir, tmp_path):
    parent, converter = start_quantize(tiny_llama_dir, tmp_path)
    parent.kill()  # SIGKILL: no Python cleanup runs
    parent.communicate(timeout=WAIT_S)
    try:
        assert wait_gone(converter), "the converter outlived tandem quantize (PR_SET_PDEATHSIG)"
        left = owned_by(parent.pid)
        assert left  # nothing could remove them ...
        assert set(left) <= set(sweep_stale_temps(temp_folder(quantize_cache_root())))  # ... until the next run's sweep
        assert owned_by(parent.pid) == []
    finally:
        _kill(converter)


def _kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass
