"""llama.cpp's own programs (``llama-server``, ``llama-imatrix``, ``llama-bench``, ...) built from the
source the installed llama-cpp-python vendors; cached, one target at a time.

The tools must be the same llama.cpp that tandem links against, so the source is the
``vendor/llama.cpp`` tree of the installed llama-cpp-python's sdist (fetched like the converter's:
``pip download`` of that version, or ``$TANDEM_LLAMA_CPP_SDIST``). Each call builds only the target
it needs (CPU, ``-march=native`` like pip's build of llama-cpp-python) into one build folder,
``cache_dir()/llama.cpp-build-<version>/build``, so a second tool reuses the compiled ggml and
llama libraries. A marker per target, written after a successful build, names the version and
flags; without it (an interrupted or failed build) the binary is never used and the next call
resumes the build (cmake builds incrementally).

    python -m tandemlm.llamacpp.programs llama-imatrix llama-bench   # prints the binaries' paths
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from tandemlm.llamacpp import sources as source_cache
from tandemlm.llamacpp.sources import ConversionError, last_error, llama_cpp_version, run_with_status
from tandemlm.models.builtin import cache_dir
from tandemlm.storage.atomic import publish_folder

MARKER = ".tandemlm-build"
# Checked against this version's CMakeLists: LLAMA_CURL is deprecated there (HTTPS is LLAMA_OPENSSL),
# and the web UI would otherwise be fetched prebuilt from a hub at build time.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
# The targets tandem runs, with what each is for (a miss lists them).
TARGETS: dict[str, str] = {
    "llama-server": "the serving bench's anchor",
    "llama-imatrix": "importance matrices for tandem quantize --imatrix",
    "llama-bench": "prompt-processing and generation speed in the quantize report (pp512, tg128)",
    "llama-perplexity": "the independent check of the report's perplexity and KL divergence",
    "llama-quantize": "the independent check of tandem's quantizer call",
}


def full_source(version: str) -> Path:
    """The whole ``vendor/llama.cpp`` tree of ``version``'s sdist, cached under ``llama.cpp-full-<version>/``.

    (The converter's cache, ``llama_cpp_source``, keeps only the Python parts.) Extracted into a temp
    folder and renamed with its marker, so an interrupted extraction is never mistaken for a tree.
    """
    target = cache_dir() / f"llama.cpp-full-{version}"
    if (target / source_cache.MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
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
        if not (staging / "CMakeLists.txt").is_file():
            raise ConversionError(f"{sdist.name} has no {source_cache.VENDOR_PREFIX}CMakeLists.txt")
        (staging / source_cache.MARKER).write_text(f"llama-cpp-python=={version}\n{sdist.name}\nfull\n")
        publish_folder(staging, target, source_cache.MARKER)
    return target


def marker_text(version: str, flags: tuple[str, ...] = CMAKE_FLAGS) -> str:
    """What the marker of a finished build of ``version`` with ``flags`` holds."""
    return f"llama-cpp-python=={version}\n" + "\n".join(flags) + "\n"


def build_root(version: str) -> Path:
    """The folder holding ``version``'s build tree and its per-target markers."""
    return cache_dir() / f"llama.cpp-build-{version}"


def cached_binary(root: Path, target: str, version: str, flags: tuple[str, ...] = CMAKE_FLAGS) -> Path | None:
    """The built ``target`` under ``root`` if a build of ``version`` with ``flags`` finished, else None."""
    binary = root / "build" / "bin" / target
    marker = root / f"{MARKER}-{target}"
    if marker.is_file() and marker.read_text() == marker_text(version, flags) and binary.is_file():
        return binary
    return None


def find_cmake() -> str | None:
    """cmake from the venv (``[dev]`` installs PyPI's ``cmake``) or else from PATH; None if neither has one."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("cmake", path=search)


def llamacpp_binary(target: str, version: str | None = None) -> Path:
    """Path of llama.cpp's ``target`` built from llama-cpp-python ``version``'s vendored source (default: installed).

    The first call per target compiles it (minutes; the ggml and llama libraries are shared by every
    target); later calls return the cached binary at once.
    """
    if target not in TARGETS:
        raise ConversionError(f"unknown llama.cpp program {target!r}; known: {', '.join(TARGETS)}")
    version = version or llama_cpp_version()
    root = build_root(version)
    if binary := cached_binary(root, target, version):
        return binary
    cmake = find_cmake()
    if cmake is None or shutil.which("c++") is None:
        missing = "cmake" if cmake is None else "a C++ compiler (c++)"
        raise ConversionError(
            f"building llama.cpp's {target} needs {missing}: `bash scripts/setup.sh` or apt-get install cmake g++"
        )
    source = full_source(version)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"{MARKER}-{target}"
    marker.unlink(missing_ok=True)  # from here until the end this target's build is unfinished
    build = root / "build"
    steps = [
        ([cmake, "-S", str(source), "-B", str(build), *CMAKE_FLAGS], f"Configuring llama.cpp for {target}"),
        (
            [cmake, "--build", str(build), "--target", target, "-j", str(os.cpu_count() or 2)],
            f"Building llama.cpp's {target} {version} (minutes on 2 cores, once)",
        ),
    ]
    for command, title in steps:
        code, lines = run_with_status(command, None, title)
        if code != 0:
            raise ConversionError(f"{title} failed: {last_error(lines)} (log: rerun `{' '.join(command)}`)")
    binary = build / "bin" / target
    if not binary.is_file():
        raise ConversionError(f"the build finished without {binary}")
    marker.write_text(marker_text(version))  # last: the build is complete
    return binary


if __name__ == "__main__":
    try:
        for name in sys.argv[1:] or ["llama-server"]:
            print(llamacpp_binary(name))
    except ConversionError as error:
        sys.exit(f"error: {error}")
