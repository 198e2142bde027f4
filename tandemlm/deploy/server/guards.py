"""ASGI guards that run before any route: Host header, API key, request-body size.

Plain ASGI rather than ``@app.middleware("http")``: that one relays every streamed chunk through
an extra task and memory stream, which costs tokens/s under concurrent streams. Each refusal is an
OpenAI-shaped error body.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandemlm.deploy.server.anthropic_schemas import anthropic_error_body
from tandemlm.deploy.server.schemas import error_body

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host header names every server accepts; the CLI adds the bind address and ``--allowed-hosts``."""


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, kind: str, code: str | None = None) -> None:
    # Anthropic's Messages path answers in Anthropic's error shape, as its SDK expects.
    body = anthropic_error_body(status, message) if str(scope.get("path", "")).startswith("/v1/messages") else error_body(message, kind, code=code)
    await JSONResponse(body, status_code=status)(scope, receive, send)


def host_name(value: str) -> str:
    """``"[::1]:8000"`` → ``"::1"``, ``"Example.COM:80"`` → ``"example.com"``: the name without port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:  # name:port; more colons is a bare IPv6 address
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostCheckMiddleware:
    """Answers 400 to a Host header outside ``allowed`` (``"*"`` allows any).

    A page on another site can point its own DNS name at 127.0.0.1 (DNS rebinding) and drive a
    local server from the browser; its requests carry that name as Host, so they are refused here.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {host_name(name) for name in allowed}
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.any:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(host) not in self.allowed:
                message = f"Host {host!r} is not served here; start the server with --allowed-hosts {host_name(host) or 'NAME'} to allow it"
                await _refuse(scope, receive, send, 400, message, "invalid_request_error", "invalid_host")
                return
        await self.app(scope, receive, send)


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None (no header, other scheme)."""
    scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def api_key_header(scope: Scope) -> bytes | None:
    """The value of an ``x-api-key`` header (how Anthropic's SDK sends its key), or None."""
    value = dict(scope["headers"]).get(b"x-api-key", b"").strip()
    return value or None


class ApiKeyMiddleware:
    """Every path but ``/health`` needs ``Authorization: Bearer <api_key>`` or ``x-api-key: <api_key>``.

    ``/health`` stays open for liveness probes; the route shows load figures only when
    ``scope["state"]["authorized"]`` is true.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            tokens = [token for token in (bearer_token(scope), api_key_header(scope)) if token is not None]
            # Every key sent must be right: a wrong one is refused even next to a right one.
            authorized = bool(tokens) and all(secrets.compare_digest(token, self.api_key) for token in tokens)
            scope.setdefault("state", {})["authorized"] = authorized
            if not authorized and scope["path"] != "/health":
                message = "invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')"
                await _refuse(scope, receive, send, 401, message, "authentication_error", "invalid_api_key")
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Answers 413 to a request body over ``max_bytes`` before it is parsed.

    A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked body
    is counted as it arrives and refused as soon as it passes the limit, so it is never held whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body is over the server's limit of {max_bytes / 2**20:g} MiB (--max-body-mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _refuse(scope, receive, send, 400, "Content-Length is not a number", "invalid_request_error")
                return
            if int(declared) > self.max_bytes:
                await _refuse(scope, receive, send, 413, self.message, "invalid_request_error", "request_too_large")
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body; the app's
                    # handler turns it into the OpenAI-shaped 413.
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)
