"""The wheel ships the files the installed package reads at run time (not only a source checkout has them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # A copy of the files git knows (a clean clone's), so no earlier build/ folder can lend the wheel its files.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and not (REPO / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("tandemlm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_ships_the_accelerate_configs_distributed_launches_with(wheel_names):
    from tandemlm.align.launch import ACCELERATE_CONFIGS, MODES

    shipped = {name for name in wheel_names if name.startswith("tandemlm/align/accelerate/")}
    expected = {f"tandemlm/align/accelerate/{config}" for pair in MODES.values() for config in pair}
    assert expected <= shipped
    assert ACCELERATE_CONFIGS == REPO / "tandemlm" / "align" / "accelerate"  # read beside the code, not from recipes/
    assert (REPO / "recipes" / "accelerate").resolve() == ACCELERATE_CONFIGS  # the README's paths still work
