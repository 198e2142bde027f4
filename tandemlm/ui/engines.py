"""The app's two model slots (policy, reference), loaded lazily and shared when they are the same.

A slot names a model (built-in name, folder, .gguf, hub id or run folder) and a backend; the engine
is loaded on first use or by the "Load" button, never at import. A model that fails to load leaves
a one-line error in the slot for the UI to show: the app stays up. Two slots naming the same model
and backend share one engine, whose batching serves both sides of a comparison at once; a LoRA
run shares its base's engine too, as an adapter view (base + adapter, no merge).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandemlm.deploy.engine import AdapterView, BaseEngine, Engine, collect
from tandemlm.deploy.load_options import LoadOptions
from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError
from tandemlm.ui.model_refs import SlotModel, resolve_slot_model

Loader = Callable[..., Engine]
"""``load_engine(model, backend, load_options=..., **options)`` or a stand-in with that signature."""


def _default_loader(model: str, backend: str, load_options: LoadOptions | None = None, **options: Any) -> Engine:
    from tandemlm.deploy.registry import load_engine

    return load_engine(model, backend, load_options, **options)


Key = tuple[str, str]
"""An engine in the pool: (the model it loaded, backend)."""


class EnginePool:
    """Loaded engines keyed by (model, backend), shared between slots and closed when unused.

    A LoRA run is served as an adapter view on its base's engine (loaded once, adapter on per
    request), so a policy run and a reference naming its base share one engine.
    """

    def __init__(self, loader: Loader | None = None, load_options: LoadOptions | None = None) -> None:
        self._loader = loader or _default_loader
        # What the user asked (tandem ui --n-ctx ...): each backend maps it, or refuses a flag it does not use.
        self._load_options = load_options or LoadOptions()
        self._engines: dict[Key, Engine] = {}
        self._users: dict[Key, int] = {}
        self._locks: dict[Key, threading.Lock] = {}
        self._adapters: dict[tuple[Key, Path], str] = {}  # adapter folder on an engine -> its name there
        self._guard = threading.Lock()

    def acquire(self, model: str, backend: str) -> tuple[Engine, Key]:
        """The engine for ``(model, backend)`` and the key to release it by; raises EngineError with one line."""
        target = _resolve(model)
        key = (target.base, backend)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per key, even when both slots ask at once
            engine = self._engines.get(key)
            if engine is None:
                engine = self._load(target, self._backend_beside_others(target.base, backend))
                self._engines[key] = engine
            if target.adapter is not None:
                engine = self._adapter_view(engine, key, target)  # the base stays loaded on failure
            with self._guard:
                self._users[key] = self._users.get(key, 0) + 1
            return engine, key

    def release(self, key: Key) -> None:
        """Drops one user of the engine; the last one out closes it."""
        with self._guard:
            self._users[key] = self._users.get(key, 0) - 1
            if self._users[key] > 0:
                return
            self._users.pop(key, None)
            engine = self._engines.pop(key, None)
            self._adapters = {k: v for k, v in self._adapters.items() if k[0] != key}
        if engine is not None:
            engine.close()

    def close(self) -> None:
        """Closes every engine."""
        with self._guard:
            engines, self._engines = list(self._engines.values()), {}
            self._users.clear()
            self._adapters.clear()
        for engine in engines:
            engine.close()

    def must_close_first(self, held: Key | None, model: str, backend: str) -> bool:
        """Whether ``model`` wants vLLM while the engine ``held`` (one user) is the vLLM engine in its way.

        vLLM serves one model per process, so that user's engine has to close before the new one
        can load there; loading beside it would put the new model on transformers (``auto``) or be
        refused (``vllm``).
        """
        if held is None or backend not in ("auto", "vllm"):
            return False
        with self._guard:
            engine = self._engines.get(held)
            others = [k for k, e in self._engines.items() if k != held and e.info.backend == "vllm"]
            sole = engine is not None and engine.info.backend == "vllm" and self._users.get(held) == 1
        try:
            base = _resolve(model).base
            if not sole or others or base == held[0]:  # the same base: an adapter view, no second engine
                return False
            if backend == "vllm":
                return True
            from tandemlm.deploy.auto import choose_backend
            from tandemlm.models.resolve import resolve_model

            return choose_backend(_one_line(lambda: resolve_model(base), base, backend)) == "vllm"
        except EngineError:
            return False  # a bad reference: the load itself fails and says why, the old engine untouched

    def _backend_beside_others(self, base: str, backend: str) -> str:
        """The backend to load ``base`` with, given the engines already open.

        vLLM serves one model per process (and claims most of the GPU for it), so while another
        model runs on vLLM, ``auto`` sends this one to transformers, and an explicit ``vllm`` is
        refused with what to do instead. A LoRA run of the same base needs no second engine.
        """
        with self._guard:
            other = next((k[0] for k, e in self._engines.items() if k[0] != base and e.info.backend == "vllm"), None)
        if other is None or backend not in ("auto", "vllm"):
            return backend
        if backend == "vllm":
            raise EngineError(
                f"{other} already runs on vLLM, which serves one model per process: load {base} with the "
                "transformers backend, or compare a LoRA run with its own base (one engine, adapter on and off)"
            )
        from tandemlm.deploy.auto import choose_backend
        from tandemlm.models.resolve import resolve_model

        source = _one_line(lambda: resolve_model(base), base, backend)
        return "transformers" if choose_backend(source) == "vllm" else backend

    def _load(self, target: SlotModel, backend: str) -> Engine:
        options: dict[str, Any] = {"load_options": self._load_options}
        if target.adapter is not None:  # vLLM switches LoRA on only for adapters it gets at load
            options["adapters"] = {target.adapter_name: target.adapter}
        engine = _one_line(lambda: self._loader(target.base, backend, **options), target.base, backend)
        if target.adapter is not None:
            self._adapters[((target.base, backend), target.adapter)] = target.adapter_name
        _prime(engine)
        return engine

    def _adapter_view(self, engine: Engine, key: Key, target: SlotModel) -> Engine:
        """The adapter of ``target`` on ``engine``, loading it there first if needed."""
        assert target.adapter is not None
        if not isinstance(engine, BaseEngine):
            raise EngineError(f"the {engine.info.backend} backend cannot serve LoRA adapters")
        name = self._adapters.get((key, target.adapter))
        if name is None:
            taken = {n for (k, _), n in self._adapters.items() if k == key}
            name = target.adapter_name
            while name in taken:  # two runs of the same folder name on one base
                name += "'"
            _one_line(lambda: engine.load_adapter(name, str(target.adapter)), str(target.adapter), key[1])
            self._adapters[(key, target.adapter)] = name
        return engine.adapter_view(name, engine.info.model_id)


def _resolve(model: str) -> SlotModel:
    try:
        return resolve_slot_model(model)
    except EngineError:
        raise
    except (OSError, ValueError) as exc:  # a damaged run.json or unreadable folder
        raise EngineError(f"could not read {model}: {exc}") from None


def _one_line(action: Callable[[], Any], what: str, backend: str) -> Any:
    """Runs ``action``; any failure becomes one EngineError line (the app stays up)."""
    try:
        return action()
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure must leave the app up, as one line
        message = str(exc).strip("'\"").splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"could not load {what} ({backend}): {message}") from None


def _naming(message: str, model: str, backend: str) -> str:
    """``message`` with the model it is about in front, unless it names it already."""
    return message if model in message else f"could not load {model} ({backend}): {message}"


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
        self.error: str | None = None  # why ``model`` itself does not load
        self.failed: str | None = None  # the last Load that failed while the slot kept ``model`` (loaded)
        self._pool = pool
        self._engine: Engine | None = None
        self._held: Key | None = None
        self._lock = threading.Lock()
        self._switching = threading.Lock()

    def set(self, model: str, backend: str = "auto") -> None:
        """Points the slot at another model; it loads on the next :meth:`get` (the old engine goes now).

        The Load button uses :meth:`load` instead, which keeps the old engine when the new one fails.
        """
        model, backend = model.strip(), backend or "auto"
        with self._lock:
            if (model, backend) == (self.model, self.backend) and self._engine is not None:
                return
            self._drop()
            self.model, self.backend, self.error, self.failed = model, backend, None, None

    def load(self, model: str, backend: str = "auto") -> Engine:
        """Loads ``model`` now and only then swaps it in; raises EngineError (one line) when it fails.

        A failed load leaves a loaded engine in place (it goes on answering, and ``failed`` says what
        failed for the status line); with nothing loaded to keep, the slot names the new model and
        keeps its error, as :meth:`set` and :meth:`get` would. The engine in use goes on answering
        while the new one loads. Both are in memory for that while, so a model that only fits once
        the old one is gone fails here (and the old one stays). vLLM is the exception: it serves one
        model per process, so a slot's own vLLM engine closes first when the new model wants vLLM,
        and is loaded again if the new one fails.
        """
        model, backend = model.strip(), backend or "auto"
        with self._switching:  # one switch at a time; chats keep using the old engine meanwhile
            with self._lock:
                if (model, backend) == (self.model, self.backend) and self._engine is not None:
                    self.failed = None
                    return self._engine
                if self._pool.must_close_first(self._held, model, backend):
                    return self._load_after_closing(model, backend)
            try:
                engine, held = self._pool.acquire(model, backend)
            except EngineError as exc:
                with self._lock:
                    if self._engine is None:
                        self.model, self.backend, self.error, self.failed = model, backend, str(exc), None
                    else:
                        self.failed = _naming(str(exc), model, backend)
                raise
            with self._lock:
                self._drop()
                self._engine, self._held = engine, held
                self.model, self.backend, self.error, self.failed = model, backend, None, None
                return engine

    def get(self) -> Engine:
        """The slot's engine, loading it if needed; raises EngineError (also kept in ``error``)."""
        with self._lock:
            if self._engine is not None:
                return self._engine
            if not self.model:
                self.error = f"no {self.role} model set"
                raise EngineError(self.error)
            try:
                self._engine, self._held = self._pool.acquire(self.model, self.backend)
            except EngineError as exc:
                self.error = str(exc)
                raise
            self.error = None
            return self._engine

    def _load_after_closing(self, model: str, backend: str) -> Engine:
        """Closes the slot's vLLM engine, loads ``model``, and on failure loads the old model back.

        Called with ``_lock`` held, so no chat reloads the old model halfway through.
        """
        old = self.model, self.backend
        self._drop()
        try:
            self._engine, self._held = self._pool.acquire(model, backend)
        except EngineError as exc:
            try:
                self._engine, self._held = self._pool.acquire(*old)
            except EngineError:  # nothing working to keep any more: the slot names the new model
                self.model, self.backend, self.error, self.failed = model, backend, str(exc), None
                raise exc from None
            self.failed = _naming(str(exc), model, backend)
            raise
        self.model, self.backend, self.error, self.failed = model, backend, None, None
        return self._engine

    @property
    def loaded(self) -> bool:
        """Whether the engine is loaded now."""
        return self._engine is not None

    @property
    def problem(self) -> str | None:
        """What went wrong, as one line: the last failed Load and what the slot kept, or its own load error."""
        if self.failed and self._engine is not None:
            return f"{self.failed}; `{self.model}` is still loaded"
        return self.error

    def status(self) -> str:
        """One line for the UI: loaded (with backend and context), not loaded yet, or what failed."""
        if self.error and not (self.failed and self._engine is not None):
            return f"**{self.role}**: ⚠ {self.error}"
        if self._engine is not None:
            info = self._engine.info
            lora = f"LoRA on `{self._held[0]}`, " if isinstance(self._engine, AdapterView) and self._held else ""
            loaded = f"({lora}{info.backend}, context {info.context_length})"
            if self.failed:
                return f"**{self.role}**: ⚠ {self.problem} {loaded}"
            return f"**{self.role}**: `{self.model}` loaded {loaded}"
        return f"**{self.role}**: `{self.model}` (loads on first use)"

    def _drop(self) -> None:
        if self._held is not None:
            self._pool.release(self._held)
        self._engine, self._held = None, None
