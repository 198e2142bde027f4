"""Builds llama.cpp's own ``llama-server`` (the serving bench's anchor); cached.

A thin entry point onto :mod:`tandemlm.llamacpp.programs`, which builds every llama.cpp program
tandem runs from the source the installed llama-cpp-python vendors, in one shared build folder.

    .venv/bin/python bench/build_llama_server.py     # prints the binary's path (minutes the first time)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tandemlm.llamacpp.programs import llamacpp_binary
from tandemlm.llamacpp.sources import ConversionError


def llama_server_binary(version: str | None = None) -> Path:
    """Path of a ``llama-server`` built from llama-cpp-python ``version``'s vendored llama.cpp (default: installed)."""
    return llamacpp_binary("llama-server", version)


if __name__ == "__main__":
    try:
        print(llama_server_binary())
    except ConversionError as error:
        sys.exit(f"error: {error}")
