"""Flag groups that several commands share, declared once: the engine flags (``generate``, ``chat``,
``serve``, ``quantize --serve``), the sampling flags (``generate``, ``chat``) and the serving flags
(``serve``, ``quantize --serve``).

A command names a group as one parameter (``engine: EngineFlags``); :func:`with_flags` puts the
group's flags into the command's signature for Typer (same names, help and defaults everywhere,
a command may change a default) and hands the command one dataclass instance.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandemlm.cli import options as opt

if TYPE_CHECKING:
    from tandemlm.deploy.server.config import ServerConfig
    from tandemlm.deploy.types import SamplingParams


@dataclass
class EngineFlags:
    """How to load a model: the backend and what any backend may be asked at load."""

    backend: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    cache_ram: int | None = None
    speculative: str | None = None
    kv_layout: str | None = None

    def options(self, n_parallel: int | None = 1, tensor: int | None = None, pipeline: int | None = None) -> opt.EngineOptions:
        """The load options for a command that decodes ``n_parallel`` requests at once."""
        return opt.EngineOptions(self.backend, self.n_ctx, self.n_threads, self.n_gpu_layers, n_parallel, self.dtype,
                                 self.trust_remote_code, tensor, pipeline, self.cache_ram, self.speculative,
                                 self.kv_layout)


@dataclass
class SamplingFlags:
    """How to sample, as the OpenAI API names it."""

    max_tokens: int = opt.DEFAULTS.max_tokens or 256
    temperature: float = opt.DEFAULTS.temperature
    top_p: float = opt.DEFAULTS.top_p
    top_k: int = opt.DEFAULTS.top_k
    stop: list[str] | None = None
    seed: int | None = None
    repetition_penalty: float = opt.DEFAULTS.repetition_penalty

    def params(self) -> SamplingParams:
        """The sampling settings; a bad value exits with a one-line error naming the flag."""
        return opt.sampling_from_flags(**asdict(self))


@dataclass
class ServeFlags:
    """Where and how the HTTP server listens and queues."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    n_parallel: int | None = 8
    max_queue: int = 64
    max_body_mb: float = 8.0
    allowed_hosts: list[str] | None = None

    def server(self) -> ServerConfig:
        """The server's settings; a bad value exits with a one-line error naming the flag."""
        values = asdict(self)
        values["n_parallel"] = 8 if self.n_parallel is None else self.n_parallel
        return opt.server_config(**values)


Host = Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")]
Port = Annotated[int, typer.Option("--port", help="TCP port (1-65535).")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="TANDEM_API_KEY", help="Require this key on every path but /health (Authorization: Bearer KEY, or x-api-key: KEY).")]

# Each group field's flag: its type with Typer's option (name and help).
FLAGS: dict[str, Any] = {
    "backend": opt.Backend, "n_ctx": opt.NCtx, "n_threads": opt.NThreads, "n_gpu_layers": opt.NGpuLayers,
    "dtype": opt.Dtype, "trust_remote_code": opt.TrustRemoteCode, "cache_ram": opt.CacheRam,
    "speculative": opt.Speculative, "kv_layout": opt.KvLayout,
    "max_tokens": opt.MaxTokens, "temperature": opt.Temperature, "top_p": opt.TopP, "top_k": opt.TopK, "stop": opt.Stop,
    "seed": opt.Seed, "repetition_penalty": opt.RepetitionPenalty,
    "host": Host, "port": Port, "api_key": ApiKey, "n_parallel": opt.NParallel, "max_queue": opt.MaxQueue,
    "max_body_mb": opt.MaxBodyMb, "allowed_hosts": opt.AllowedHosts,
}


def with_flags(**groups: type | tuple[type, dict[str, Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Expands each named group parameter of a command into the group's flags (``(Group, {"field": default})``
    changes defaults for this command) and passes the command one instance per group."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for name, p in signature.parameters.items() if name not in groups]
        members: dict[str, tuple[type, list[str]]] = {}
        added = []
        for group, spec in groups.items():
            cls, defaults = spec if isinstance(spec, tuple) else (spec, {})
            names = [f.name for f in fields(cls)]
            members[group] = (cls, names)
            for field in fields(cls):
                default = defaults.get(field.name, field.default)
                added.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=FLAGS[field.name]))
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:
            raise TypeError(f"{command.__name__}: {', '.join(sorted(clash))} is both a flag of a group and its own")

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group, (cls, names) in members.items():
                values[group] = cls(**{name: values.pop(name) for name in names})
            return command(**values)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate
