"""FastAPI routes of the OpenAI-compatible server: thin handlers over :mod:`.service`."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.schemas import ChatCompletionRequest, CompletionRequest, error_body
from tandemlm.deploy.server.service import Admission, ChatChunks, ServerBusy, TextChunks, iterate_in_thread
from tandemlm.deploy.types import ContextLengthError, Delta, EngineError, SamplingParams, Usage


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class ApiKeyMiddleware:
    """Rejects ``/v1`` requests without ``Authorization: Bearer <api_key>``.

    Plain ASGI rather than ``@app.middleware("http")``: that one relays every streamed chunk
    through an extra task and memory stream, which costs tokens/s under concurrent streams.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header.removeprefix(b"Bearer ").strip()
            if not secrets.compare_digest(given, self.api_key):
                message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
                response = _error(401, message, "authentication_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None, max_concurrency: int = 8, max_queue: int = 64) -> FastAPI:
    """An OpenAI-compatible app serving ``engine``; ``api_key`` (optional) is checked as a Bearer token."""
    app = FastAPI(title="tandemlm", version="0.1.0")
    admission = Admission(max_concurrency, max_queue)
    app.state.admission = admission
    app.state.engine = engine
    defaults = SamplingParams()

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

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
        return _error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": admission.running, "queued": admission.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = engine.info
        return {"object": "list", "data": [{"id": info.model_id, "object": "model", "created": 0, "owned_by": f"tandemlm/{info.backend}"}]}

    def sampling(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
        values = {"max_tokens": defaults.max_tokens, "temperature": 1.0} | body.sampling_kwargs()
        return SamplingParams(**values)

    async def respond(body: ChatCompletionRequest | CompletionRequest, make: Any, chunks: ChatChunks) -> Any:
        if admission.waiting >= admission.max_queue:
            raise ServerBusy(f"server busy: {admission.running} running and {admission.waiting} queued requests")
        params = sampling(body)
        stream: Iterator[Delta] = make(params)  # validates (context length, template) before any output
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return StreamingResponse(_stream(stream, chunks, include_usage), media_type="text/event-stream")
        text, reasoning, finish, usage = [], [], "stop", Usage()
        async with admission.slot():
            async for delta in iterate_in_thread(stream):
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                finish = delta.finish_reason or finish
                usage = delta.usage or usage
        return chunks.full("".join(text), "".join(reasoning), finish, usage)

    async def _stream(stream: Iterator[Delta], chunks: ChatChunks, include_usage: bool) -> AsyncIterator[str]:
        async with admission.slot():
            if not isinstance(chunks, TextChunks):
                yield _sse(chunks.role_chunk())
            try:
                async for delta in iterate_in_thread(stream):
                    yield _sse(chunks.chunk(delta))
                    if delta.usage and include_usage:
                        yield _sse(chunks.usage_chunk(delta.usage))
            except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band and end cleanly
                yield _sse(error_body(f"generation failed: {exc}", "server_error"))
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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        messages = [m.as_message() for m in body.messages]
        return await guarded(lambda: respond(body, lambda p: engine.chat(messages, p), ChatChunks(engine.info.model_id)))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await guarded(lambda: respond(body, lambda p: engine.generate(body.prompt_text(), p), TextChunks(engine.info.model_id)))

    return app
