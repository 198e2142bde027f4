"""Backends register themselves by name; the CLI, server and UI look them up here.

Backend modules import their heavy library lazily, so registering costs nothing and
``tandem env`` can list every backend with whether it can run on this machine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tandemlm.deploy.load_options import LoadOptions, backend_kwargs

if TYPE_CHECKING:
    from tandemlm.deploy.engine import Engine
    from tandemlm.models.resolve import ModelSource


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[..., Engine]
    """``load(source: ModelSource, **options) -> Engine``."""
    available: Callable[[], str | None]
    """Returns None when usable here, else a one-line reason why not."""
    description: str
    hidden: bool = False
    """True for a backend only tests use (``mock``): loadable by name, never offered to users."""
    options: Mapping[str, str] = field(default_factory=dict)
    """LoadOptions fields this backend honours -> its own keyword for each (load_options.backend_kwargs)."""


_BACKENDS: dict[str, Backend] = {}

# Modules that register the built-in backends when imported.
_BUILTIN_MODULES = (
    "tandemlm.deploy.hf_engine",
    "tandemlm.deploy.llamacpp_engine",
    "tandemlm.deploy.vllm_engine",
    "tandemlm.deploy.mock_engine",
)


def register_backend(
    name: str, description: str, available: Callable[[], str | None], hidden: bool = False,
    options: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    """Decorator for a backend's ``load`` function; ``hidden`` keeps it out of :func:`offered_backends`;
    ``options`` maps the LoadOptions it honours to its own keyword names."""

    def wrap(load: Callable[..., Engine]) -> Callable[..., Engine]:
        _BACKENDS[name] = Backend(
            name=name, load=load, available=available, description=description, hidden=hidden, options=dict(options or {}),
        )
        return load

    return wrap


def _ensure_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            # One broken backend must not take the others down; `tandem env` shows why.
            name = module.rsplit(".", 1)[-1].removesuffix("_engine")
            reason = f"backend module failed to import: {exc}"
            _BACKENDS.setdefault(name, Backend(name, _unloadable(reason), lambda r=reason: r, reason))


def _unloadable(reason: str) -> Callable[..., Engine]:
    def load(*_: Any, **__: Any) -> Engine:
        raise RuntimeError(reason)

    return load


def backends() -> dict[str, Backend]:
    """Every registered backend by name, hidden (test-only) ones included."""
    _ensure_builtins()
    return dict(_BACKENDS)


def offered_backends() -> dict[str, Backend]:
    """The backends users may pick (``tandem env``, the UI's dropdown, the unknown-name hint)."""
    return {name: backend for name, backend in backends().items() if not backend.hidden}


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (hidden ones too); an unknown name lists the offered ones."""
    known = backends()
    if name not in known:
        raise KeyError(f"unknown backend {name!r}; known backends: {', '.join(sorted(offered_backends()))}")
    return known[name]


def load_engine(
    model: str | ModelSource, backend: str = "auto", load_options: LoadOptions | None = None, **options: Any
) -> Engine:
    """Resolves ``model`` and loads it with ``backend`` (``auto`` picks one for the model and machine).

    ``load_options`` (what the user asked, e.g. from CLI flags) are mapped onto the chosen backend's own names,
    and one it does not honour fails naming the flag; ``options`` go to the backend as they are."""
    from tandemlm.deploy.auto import choose_backend
    from tandemlm.models.resolve import ModelSource, resolve_model

    if backend != "auto":
        get_backend(backend)  # fail on an unknown name before touching the model
    trust = bool(options.get("trust_remote_code", False))
    source = model if isinstance(model, ModelSource) else resolve_model(model, trust_remote_code=trust)
    name = choose_backend(source) if backend == "auto" else backend
    chosen = get_backend(name)
    if load_options is not None:
        options = {**backend_kwargs(load_options, name, chosen.options), **options}
    reason = chosen.available()
    if reason:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return chosen.load(source, **options)
