"""The OpenAI-compatible app: guards, a :class:`ServeContext` and the routes of :mod:`.routes`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import FastAPI

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.config import WILDCARD_BINDS, ServerConfig
from tandemlm.deploy.server.context import ServeContext
from tandemlm.deploy.server.guards import LOCAL_HOSTS, ApiKeyMiddleware, BodyLimitMiddleware, HostCheckMiddleware
from tandemlm.deploy.server.routes import EXCEPTION_HANDLERS, router


def create_app(
    engine: Engine | Mapping[str, Engine],
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_queue: int = 64,
    max_body_bytes: int = 8 * 2**20,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine`` (or several, by model name; the first is the default).

    ``api_key`` (optional) is checked as a Bearer token on every path but ``/health``; bodies over
    ``max_body_bytes`` get 413; Host headers outside ``allowed_hosts`` (``"*"``: any) get 400.
    """
    engines = dict(engine) if isinstance(engine, Mapping) else {engine.info.model_id: engine}
    ctx = ServeContext(engines, max_concurrency, max_queue)
    app = FastAPI(title="tandemlm", version="0.1.0")
    app.state.context = ctx
    app.state.admission = ctx.admission
    app.state.engine = next(iter(engines.values()))

    # Added last runs first: Host check, then the key (no body read without it), then the body size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts)

    for error, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(router)
    return app


def run_server(engine: Engine | Mapping[str, Engine], config: ServerConfig) -> None:
    """Serves ``engine`` (or several, by model name) with ``config`` until interrupted, then closes them."""
    import typer
    import uvicorn

    engines = dict(engine) if isinstance(engine, Mapping) else {engine.info.model_id: engine}
    app = create_app(engines, **config.app_options())
    for name, served in engines.items():
        typer.secho(f"serving {name} ({served.info.backend}) on http://{config.host}:{config.port}/v1", err=True)
    if config.host in WILDCARD_BINDS and "*" not in config.allowed_hosts:
        hosts = ", ".join(config.accepted_hosts())
        typer.secho(f"answering Host names {hosts}; add the names clients use with --allowed-hosts", err=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        app.state.context.close()
        for served in engines.values():
            served.close()
