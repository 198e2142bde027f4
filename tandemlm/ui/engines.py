"""The app's two model slots (policy, reference), loaded lazily and shared when they are the same.

A slot names a model (built-in name, folder, .gguf, hub id or run folder) and a backend; the engine
is loaded on first use or by the "Load" button, never at import. A model that fails to load leaves
a one-line error in the slot for the UI to show: the app stays up. Two slots naming the same model
and backend share one engine, whose batching serves both sides of a comparison at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from tandemlm.deploy.engine import Engine, collect
from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError
from tandemlm.ui.runs import resolve_model_ref

Loader = Callable[..., Engine]
"""``load_engine(model, backend, **options)`` or a stand-in with that signature."""


def _default_loader(model: str, backend: str, **options: Any) -> Engine:
    from tandemlm.deploy.registry import load_engine

    return load_engine(model, backend, **options)


class EnginePool:
    """Loaded engines keyed by (model, backend), shared between slots and closed when unused."""

    def __init__(self, loader: Loader | None = None, **load_options: Any) -> None:
        self._loader = loader or _default_loader
        self._options = {k: v for k, v in load_options.items() if v is not None}
        self._engines: dict[tuple[str, str], Engine] = {}
        self._users: dict[tuple[str, str], int] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def acquire(self, model: str, backend: str) -> Engine:
        """The engine for ``(model, backend)``, loading it once; raises EngineError with one line."""
        key = (model, backend)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per key, even when both slots ask at once
            engine = self._engines.get(key)
            if engine is None:
                engine = self._load(model, backend)
                self._engines[key] = engine
            with self._guard:
                self._users[key] = self._users.get(key, 0) + 1
            return engine

    def release(self, model: str, backend: str) -> None:
        """Drops one user of the engine; the last one out closes it."""
        key = (model, backend)
        with self._guard:
            self._users[key] = self._users.get(key, 0) - 1
            if self._users[key] > 0:
                return
            self._users.pop(key, None)
            engine = self._engines.pop(key, None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        """Closes every engine."""
        with self._guard:
            engines, self._engines = list(self._engines.values()), {}
            self._users.clear()
        for engine in engines:
            engine.close()

    def _load(self, model: str, backend: str) -> Engine:
        try:
            engine = self._loader(resolve_model_ref(model), backend, **self._options)
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure must leave the app up, as one line
            message = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
            raise EngineError(f"could not load {model} ({backend}): {message}") from None
        _prime(engine)
        return engine


def _prime(engine: Engine) -> None:
    """Answers one short chat message so the user's first message does not pay for first-use set-up.

    The first chat renders the template through transformers (imported on first use, plus the
    Jinja compile): about 1.4 s of the built-in model's first-token time on 2 busy cores, against
    0.2 s afterwards.
    """
    params = SamplingParams(max_tokens=2, temperature=0.0)
    try:
        collect(engine.chat([{"role": "user", "content": "Hello"}], params))
    except EngineError:
        try:  # no chat template: warm the plain completion path instead
            collect(engine.generate("Hello", params))
        except EngineError:
            pass  # a model that cannot generate shows that on first real use


class EngineSlot:
    """One role in the app (``policy`` or ``reference``): which model it names, and its engine once loaded."""

    def __init__(self, role: str, pool: EnginePool, model: str, backend: str = "auto") -> None:
        self.role = role
        self.model = model
        self.backend = backend
        self.error: str | None = None
        self._pool = pool
        self._engine: Engine | None = None
        self._held: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def set(self, model: str, backend: str = "auto") -> None:
        """Points the slot at another model; it loads on the next :meth:`get`."""
        model, backend = model.strip(), backend or "auto"
        with self._lock:
            if (model, backend) == (self.model, self.backend) and self._engine is not None:
                return
            self._drop()
            self.model, self.backend, self.error = model, backend, None

    def get(self) -> Engine:
        """The slot's engine, loading it if needed; raises EngineError (also kept in ``error``)."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            if not self.model:
                self.error = f"no {self.role} model set"
                raise EngineError(self.error)
            try:
                self._engine = self._pool.acquire(self.model, self.backend)
            except EngineError as exc:
                self.error = str(exc)
                raise
            self._held, self.error = (self.model, self.backend), None
            return self._engine

    @property
    def loaded(self) -> bool:
        """Whether the engine is loaded now."""
        return self._engine is not None

    def status(self) -> str:
        """One line for the UI: loaded (with backend and context), not loaded yet, or the load error."""
        if self.error:
            return f"**{self.role}**: ⚠ {self.error}"
        if self._engine is not None:
            info = self._engine.info
            return f"**{self.role}**: `{self.model}` loaded ({info.backend}, context {info.context_length})"
        return f"**{self.role}**: `{self.model}` (loads on first use)"

    def _drop(self) -> None:
        if self._held is not None:
            self._pool.release(*self._held)
        self._engine, self._held = None, None
