"""FastAPI routes of the OpenAI-compatible server: thin handlers over :mod:`.service`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.config import WILDCARD_BINDS, ServerConfig
from tandemlm.deploy.server.guards import LOCAL_HOSTS, ApiKeyMiddleware, BodyLimitMiddleware, HostCheckMiddleware
from tandemlm.deploy.server.schemas import ChatCompletionRequest, CompletionRequest, error_body
from tandemlm.deploy.server.service import Admission, ChatChunks, ServerBusy, TextChunks, Ticket, iterate_in_thread
from tandemlm.deploy.types import ContextLengthError, Delta, SamplingParams, Usage
from tandemlm.errors import EngineError


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _AdmittedStream(StreamingResponse):
    """A streamed response that gives back its admission ticket however it ends, started or not."""

    def __init__(self, ticket: Ticket, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_concurrency: int = 8,
    max_queue: int = 64,
    max_body_bytes: int = 8 * 2**20,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``.

    ``api_key`` (optional) is checked as a Bearer token on every path but ``/health``; bodies over
    ``max_body_bytes`` get 413; Host headers outside ``allowed_hosts`` (``"*"``: any) get 400.
    """
    app = FastAPI(title="tandemlm", version="0.1.0")
    admission = Admission(max_concurrency, max_queue)
    app.state.admission = admission
    app.state.engine = engine
    defaults = SamplingParams()

    # Added last runs first: Host check, then the key (no body read without it), then the body size.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        return _error(400, f"{field}: {message}" if field else message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error", code=code)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # Without the key (when one is set) only liveness: load figures are nobody else's business.
        if not request.scope.get("state", {}).get("authorized", True):
            return {"status": "ok"}
        return {"status": "ok", "running": admission.running, "queued": admission.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = engine.info
        return {"object": "list", "data": [{"id": info.model_id, "object": "model", "created": 0, "owned_by": f"tandemlm/{info.backend}"}]}

    def sampling(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        values = {"max_tokens": defaults.max_tokens, "temperature": 1.0} | body.sampling_kwargs()
        return SamplingParams(**values)

    async def respond(body: ChatCompletionRequest | CompletionRequest, make: Any, chunks: ChatChunks) -> Any:
        # Admitted, queued or 503, decided before any work and before the response starts.
        ticket = admission.claim()
        try:
            params = sampling(body)
            stream: Iterator[Delta] = make(params)  # validates (context length, template) before any output
        except BaseException:
            ticket.release()
            raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _AdmittedStream(ticket, _stream(ticket, stream, chunks, include_usage))
        text, reasoning, finish, usage = [], [], "stop", Usage()
        try:
            await ticket.admitted()
            async for delta in iterate_in_thread(stream):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
        except Exception as exc:  # noqa: BLE001 - the request was validated above: a failure now is ours (5xx)
            return _error(500, f"generation failed: {exc}", "server_error")
        finally:
            ticket.release()
        return chunks.full("".join(text), "".join(reasoning), finish, usage)

    async def _stream(ticket: Ticket, stream: Iterator[Delta], chunks: ChatChunks, include_usage: bool) -> AsyncIterator[str]:
        try:
            await ticket.admitted()  # a queued request waits here; its place is already claimed
            if not isinstance(chunks, TextChunks):
                yield _sse(chunks.role_chunk())
            try:
                async for delta in iterate_in_thread(stream):
                    yield _sse(chunks.chunk(delta))
                    if delta.usage and include_usage:
                        yield _sse(chunks.usage_chunk(delta.usage))
            except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band and end cleanly
                yield _sse(error_body(f"generation failed: {exc}", "server_error"))
        finally:
            ticket.release()
        yield _sse("[DONE]")

    async def guarded(fn: Any) -> Any:
        try:
            return await fn()
        except ContextLengthError as exc:
            return _error(400, str(exc), param="messages", code="context_length_exceeded")
        except (EngineError, ValueError) as exc:
            return _error(400, str(exc))
        except ServerBusy as exc:
            return _error(503, str(exc), "server_busy", code="server_busy")
        except Exception as exc:  # noqa: BLE001 - anything else is our failure, not the client's: 5xx
            return _error(500, f"internal error: {exc}", "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        messages = [m.as_message() for m in body.messages]
        return await guarded(lambda: respond(body, lambda p: engine.chat(messages, p), ChatChunks(engine.info.model_id)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await guarded(lambda: respond(body, lambda p: engine.generate(body.prompt_text(), p), TextChunks(engine.info.model_id)))

    return app


def run_server(engine: Engine, config: ServerConfig) -> None:
    """Serves ``engine`` with ``config`` until interrupted, then closes the engine."""
    import typer
    import uvicorn

    app = create_app(engine, **config.app_options())
    typer.secho(f"serving {engine.info.model_id} ({engine.info.backend}) on http://{config.host}:{config.port}/v1", err=True)
    if config.host in WILDCARD_BINDS and "*" not in config.allowed_hosts:
        hosts = ", ".join(config.accepted_hosts())
        typer.secho(f"answering Host names {hosts}; add the names clients use with --allowed-hosts", err=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        engine.close()
