"""Builds llama.cpp's own ``llama-server`` from the source the installed llama-cpp-python vendors; cached.

The bench's anchor must be the same llama.cpp that tandem links against, so the source is the
``vendor/llama.cpp`` tree of the installed llama-cpp-python's sdist (fetched like the converter's:
``pip download`` of that version, or ``$TANDEM_LLAMA_CPP_SDIST``). Only the ``llama-server`` target is
built (CPU, ``-march=native`` like pip's build of llama-cpp-python), into
``cache_dir()/llama-server-<version>/build``. A marker file written after a successful build names the
version and flags; without it (an interrupted or failed build) the binary is never used and the next
call resumes the build (cmake builds incrementally).

    .venv/bin/python bench/build_llama_server.py     # prints the binary's path (about 10-20 min the first time)
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from tandemlm.models import llamacpp_source as source_cache
from tandemlm.models.atomic import publish_folder
from tandemlm.models.builtin import cache_dir
from tandemlm.models.llamacpp_source import ConversionError, last_error, llama_cpp_version, run_with_status

MARKER = ".tandemlm-build"
# Checked against this version's CMakeLists: LLAMA_CURL is deprecated there (HTTPS is LLAMA_OPENSSL),
# and the web UI would otherwise be fetched prebuilt from a hub at build time.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
TARGET = "llama-server"


def full_source(version: str) -> Path:
    """The whole ``vendor/llama.cpp`` tree of ``version``'s sdist, cached under ``llama.cpp-full-<version>/``.

    (The converter's cache, ``llama_cpp_source``, keeps only the Python parts.) Extracted into a temp
    folder and renamed with its marker, so an interrupted extraction is never mistaken for a tree.
    """
    target = cache_dir() / f"llama.cpp-full-{version}"
    if (target / source_cache.MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        # The converter's sdist lookup: pip download of this version, or $TANDEM_LLAMA_CPP_SDIST.
        sdist = source_cache._find_or_download_sdist(version, Path(tmp) / "download")
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                _, _, rest = member.name.partition("/")  # drop the sdist's top folder
                if rest.startswith(source_cache.VENDOR_PREFIX) and member.isfile():
                    member.name = rest[len(source_cache.VENDOR_PREFIX) :]
                    tar.extract(member, staging, filter="data")
        if not (staging / "tools" / "server" / "CMakeLists.txt").is_file():
            raise ConversionError(f"{sdist.name} has no {source_cache.VENDOR_PREFIX}tools/server")
        (staging / source_cache.MARKER).write_text(f"llama-cpp-python=={version}\n{sdist.name}\nfull\n")
        publish_folder(staging, target, source_cache.MARKER)
    return target


def marker_text(version: str, flags: tuple[str, ...] = CMAKE_FLAGS) -> str:
    """What the marker of a finished build of ``version`` with ``flags`` holds."""
    return f"llama-cpp-python=={version}\n" + "\n".join(flags) + "\n"


def cached_binary(build_root: Path, version: str, flags: tuple[str, ...] = CMAKE_FLAGS) -> Path | None:
    """The built binary under ``build_root`` if a build of ``version`` with ``flags`` finished, else None."""
    binary = build_root / "build" / "bin" / TARGET
    marker = build_root / MARKER
    if marker.is_file() and marker.read_text() == marker_text(version, flags) and binary.is_file():
        return binary
    return None


def find_cmake() -> str | None:
    """cmake from the venv (``[dev]`` installs PyPI's ``cmake``) or else from PATH; None if neither has one."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("cmake", path=search)


def llama_server_binary(version: str | None = None) -> Path:
    """Path of a ``llama-server`` built from llama-cpp-python ``version``'s vendored llama.cpp (default: installed)."""
    version = version or llama_cpp_version()
    root = cache_dir() / f"llama-server-{version}"
    if binary := cached_binary(root, version):
        return binary
    cmake = find_cmake()
    if cmake is None or shutil.which("c++") is None:
        missing = "cmake" if cmake is None else "a C++ compiler (c++)"
        raise ConversionError(
            f"building llama-server needs {missing}: `bash scripts/setup.sh --dev` or apt-get install cmake g++"
        )
    source = full_source(version)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)  # from here until the end the build is unfinished
    build = root / "build"
    steps = [
        ([cmake, "-S", str(source), "-B", str(build), *CMAKE_FLAGS], "Configuring llama-server"),
        (
            [cmake, "--build", str(build), "--target", TARGET, "-j", str(os.cpu_count() or 2)],
            f"Building llama-server {version} (10-20 minutes on 2 cores, once)",
        ),
    ]
    for command, title in steps:
        code, lines = run_with_status(command, None, title)
        if code != 0:
            raise ConversionError(f"{title} failed: {last_error(lines)} (log: rerun `{' '.join(command)}`)")
    binary = build / "bin" / TARGET
    if not binary.is_file():
        raise ConversionError(f"the build finished without {binary}")
    (root / MARKER).write_text(marker_text(version))  # last: the build is complete
    return binary


if __name__ == "__main__":
    try:
        print(llama_server_binary())
    except ConversionError as error:
        sys.exit(f"error: {error}")
