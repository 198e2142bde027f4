"""The cache of llama.cpp's own programs built from the vendored source (no compiling here)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tandemlm.llamacpp import programs as build
from tandemlm.llamacpp.sources import ConversionError


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))


def _fake_binary(target: str, version: str = "1.0") -> Path:
    binary = build.build_root(version) / "build" / "bin" / target
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("")
    return binary


def test_a_build_counts_only_once_its_marker_matches_version_and_flags() -> None:
    binary = _fake_binary("llama-server")
    root = build.build_root("1.0")
    assert build.cached_binary(root, "llama-server", "1.0") is None  # binary but no marker: an unfinished build
    (root / f"{build.MARKER}-llama-server").write_text(build.marker_text("1.0"))
    assert build.cached_binary(root, "llama-server", "1.0") == binary
    assert build.cached_binary(root, "llama-server", "1.1") is None
    assert build.cached_binary(root, "llama-server", "1.0", (*build.CMAKE_FLAGS, "-DGGML_AVX512=OFF")) is None
    assert build.cached_binary(root, "llama-bench", "1.0") is None  # each target has its own marker
    binary.unlink()
    assert build.cached_binary(root, "llama-server", "1.0") is None


def test_a_finished_build_is_used_without_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _fake_binary("llama-imatrix")
    (build.build_root("1.0") / f"{build.MARKER}-llama-imatrix").write_text(build.marker_text("1.0"))
    monkeypatch.setattr(build, "run_with_status", lambda *a: pytest.fail("must not build"))
    assert build.llamacpp_binary("llama-imatrix", "1.0") == binary


def test_an_unknown_program_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ConversionError, match=r"unknown llama\.cpp program 'llama-cli'; known: llama-server"):
        build.llamacpp_binary("llama-cli", "1.0")


def test_full_source_extracts_the_whole_vendored_tree_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sdist = tmp_path / "llama_cpp_python-1.0.tar.gz"
    files = {"tools/server/CMakeLists.txt": b"add_executable()", "ggml/src/ggml.c": b"int x;", "CMakeLists.txt": b""}
    with tarfile.open(sdist, "w:gz") as tar:
        for relative, data in {**{f"vendor/llama.cpp/{k}": v for k, v in files.items()}, "setup.py": b""}.items():
            info = tarfile.TarInfo(f"llama_cpp_python-1.0/{relative}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("TANDEM_LLAMA_CPP_SDIST", str(sdist))
    tree = build.full_source("1.0")
    assert (tree / "ggml" / "src" / "ggml.c").read_text() == "int x;"
    assert not (tree / "setup.py").exists()
    sdist.unlink()  # a second call finds the cache and needs no sdist
    assert build.full_source("1.0") == tree
