"""Engine load settings as the user names them (the CLI's flags), mapped by each backend onto its library.

A backend registers which of these it honours and under which of its own keyword names
(``registry.register_backend(..., options=...)``); a setting the chosen backend does not use is refused
in one line naming the flag and the backend, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tandemlm.errors import EngineError


@dataclass(frozen=True)
class LoadOptions:
    """What a user may ask of any backend at load; None (and 1 for the parallel sizes) means not asked."""

    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    n_parallel: int | None = None
    dtype: str | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    cache_ram: int | None = None  # llama.cpp: MiB of RAM for prompts kept beyond the slots
    speculative: str | None = None  # llama.cpp: "ngram" drafts from the text so far
    kv_layout: str | None = None  # llama.cpp: "unified" (one pool) or "split" (a KV stream per slot)

    def given(self) -> dict[str, Any]:
        """The settings the user asked for (a parallel size of 1 is every backend's own: not asked)."""
        values = {name: value for name, value in asdict(self).items() if value is not None}
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if values.get(name) == 1:
                del values[name]
        return values


def flag(name: str) -> str:
    """The CLI flag of a LoadOptions field."""
    return "--" + name.replace("_", "-")


def backend_kwargs(options: LoadOptions, backend: str, mapping: Mapping[str, str]) -> dict[str, Any]:
    """``options`` under ``backend``'s own keyword names; a setting it does not honour fails naming its flag."""
    given = options.given()
    unused = [name for name in given if name not in mapping]
    if unused:
        takes = ", ".join(flag(name) for name in mapping) or "none of the load flags"
        verb = "is" if len(unused) == 1 else "are"
        raise EngineError(f"{', '.join(flag(n) for n in unused)} {verb} not used by the {backend} backend (it takes {takes})")
    return {mapping[name]: value for name, value in given.items()}
