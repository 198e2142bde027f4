"""What every route handler shares: the served models, admission, metrics and the prepare thread."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.prometheus import ServerMetrics
from tandemlm.deploy.server.schemas import SamplingFields
from tandemlm.deploy.server.service import Admission
from tandemlm.deploy.types import SamplingParams

T = TypeVar("T")


class ModelNotFound(LookupError):
    """The request named a model this server does not serve (a 404)."""


class ServeContext:
    """The served models by name (the first is the default) and the state shared by the routes."""

    def __init__(self, engines: dict[str, Engine], max_concurrency: int, max_queue: int) -> None:
        if not engines:
            raise ValueError("a server needs at least one model")
        self.engines = engines
        self.default_name = next(iter(engines))
        self.admission = Admission(max_concurrency, max_queue)
        self.metrics = ServerMetrics(lambda: (self.admission.running, self.admission.waiting), self.engine_counters)
        # Chat templates and tokenizers run here, off the event loop, one at a time (HF tokenizers
        # are not safe to share across threads), so a huge prompt never stalls other requests.
        self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-prepare")

    def resolve(self, model: str | None) -> tuple[str, Engine]:
        """The name and engine a request's ``model`` field picks; ModelNotFound lists the served names."""
        if model is None or model == "":
            return self.default_name, self.engines[self.default_name]
        if model in self.engines:
            return model, self.engines[model]
        raise ModelNotFound(f"model {model!r} is not served here; served models: {', '.join(self.engines)}")

    def engine_counters(self) -> dict[str, int]:
        """Each engine's own counters, summed over distinct engines (several names may serve one)."""
        total: dict[str, int] = {}
        for engine in {id(e): e for e in self.engines.values()}.values():
            for name, value in engine.counters().items():
                total[name] = total.get(name, 0) + value
        return total

    async def prepare(self, work: Callable[[], T]) -> T:
        """Runs blocking preparation (template rendering, tokenizing, validation) on the prepare thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, work)

    def close(self) -> None:
        self._prepare.shutdown(wait=False, cancel_futures=True)


def sampling_params(body: SamplingFields, default_max_tokens: int | None, **overrides: Any) -> SamplingParams:
    """The request's sampling settings over OpenAI's defaults (temperature 1; ``default_max_tokens``
    when unset: None, as many as the context leaves, for chat; 16 for text completions)."""
    values = {"max_tokens": default_max_tokens, "temperature": 1.0} | body.sampling_kwargs() | overrides
    return SamplingParams(**values)


def choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice ``choice``'s settings: its own seed stream (seed + choice) when a seed is given."""
    if params.seed is None or choice == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + choice)
