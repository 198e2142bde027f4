"""The server's routes as plain functions over the app's :class:`ServeContext`, and its one error mapping.

Each route reads the context from ``request.app.state.context`` (set by ``app.create_app``), hands
the body to a handler (:mod:`.handlers`, :mod:`.anthropic_api`, :mod:`.responses_api`,
:mod:`.introspect`) and maps what it raises to an OpenAI error body (:func:`_answer`); nothing here
knows a backend. A client that leaves before a generation's answer cancels the work (status 499).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tandemlm.deploy.server import introspect
from tandemlm.deploy.server.anthropic_api import count_tokens, create_message, reshape_error
from tandemlm.deploy.server.anthropic_schemas import CountTokensRequest, MessagesRequest, anthropic_error_body
from tandemlm.deploy.server.context import ModelNotFound, ServeContext
from tandemlm.deploy.server.handlers import GenerationFailed, Streamed, chat_completion, embeddings, text_completion
from tandemlm.deploy.server.responses_api import create_response
from tandemlm.deploy.server.responses_api_schemas import ResponsesRequest
from tandemlm.deploy.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    error_body,
)
from tandemlm.deploy.server.service import ServerBusy
from tandemlm.deploy.types import ContextLengthError
from tandemlm.errors import EngineError

router = APIRouter()
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")  # errors, validation failures included, in Anthropic's shape


def _context(request: Request) -> ServeContext:
    return request.app.state.context


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness, and the admission figures for a caller holding the key (when one is set)."""
    # Without the key (when one is set) only liveness: load figures are nobody else's business.
    if not request.scope.get("state", {}).get("authorized", True):
        return {"status": "ok"}
    ctx = _context(request)
    return {"status": "ok", "running": ctx.admission.running, "queued": ctx.admission.waiting}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """OpenAI chat completions (streamed as SSE when asked)."""
    ctx = _context(request)
    return await _guarded("/v1/chat/completions", request, lambda: chat_completion(ctx, body))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    """OpenAI text completions (streamed as SSE when asked)."""
    ctx = _context(request)
    return await _guarded("/v1/completions", request, lambda: text_completion(ctx, body))


@router.post("/v1/messages/count_tokens")
async def messages_count_tokens(body: CountTokensRequest, request: Request) -> Any:
    """Anthropic's token count: the prompt tokens a Messages request with this body would prefill."""
    ctx = _context(request)
    return await _guarded("/v1/messages/count_tokens", request, lambda: count_tokens(ctx, body), reshape_error)


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request) -> Any:
    """Anthropic's Messages API, translated onto chat completions (streamed as SSE events when asked)."""
    ctx = _context(request)
    return await _guarded("/v1/messages", request, lambda: create_message(ctx, body), reshape_error)


@router.post("/v1/embeddings")
async def embeddings_route(body: EmbeddingRequest, request: Request) -> Any:
    """OpenAI embeddings: the model's last hidden states, mean-pooled and L2-normalised."""
    ctx = _context(request)
    return await _guarded("/v1/embeddings", request, lambda: embeddings(ctx, body))


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Any:
    """OpenAI's Responses API, translated onto chat completions (streamed as SSE events when asked); nothing is stored."""
    ctx = _context(request)
    return await _guarded("/v1/responses", request, lambda: create_response(ctx, body))


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the server's counters and gauges."""
    return Response(_context(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# Introspection: answered through the same error mapping, not counted in tandem_requests.
@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI's list of models: a card per served model."""
    return introspect.list_models(_context(request))


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> Any:
    """One served model's card (404 naming the served ones)."""
    ctx = _context(request)
    return await _answer(lambda: introspect.model_card(ctx, model_id))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> Any:
    """Special tokens and chat template of a served model (lm-eval's remote tokenizer reads them)."""
    ctx = _context(request)
    return await _answer(lambda: introspect.tokenizer_info(ctx, model))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    """llama.cpp's and vLLM's /tokenize: a prompt's token ids, or a chat prompt's."""
    ctx = _context(request)
    return await _answer(lambda: introspect.tokenize(ctx, body))


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    """llama.cpp's and vLLM's /detokenize: the text of token ids."""
    ctx = _context(request)
    return await _answer(lambda: introspect.detokenize(ctx, body))


@router.post("/apply-template")
async def apply_template(body: TokenizeRequest, request: Request) -> Any:
    """llama.cpp's /apply-template: the prompt the chat template renders for messages (and tools)."""
    ctx = _context(request)
    return await _answer(lambda: introspect.apply_template(ctx, body))


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 with one line naming the field."""
    message, field = _validation_message(list(exc.errors()))
    _context(request).metrics.requests.labels(request.url.path, "400").inc()
    if request.url.path in ANTHROPIC_PATHS:
        return JSONResponse(anthropic_error_body(400, message), status_code=400)
    return _error(400, message, param=field)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's HTTP errors (404, 405, 413 from the body guard) as OpenAI error bodies (Anthropic's on its path)."""
    if request.url.path in ANTHROPIC_PATHS:
        return JSONResponse(anthropic_error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)
    code = "request_too_large" if exc.status_code == 413 else None
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error(exc.status_code, str(exc.detail), kind, code=code)


EXCEPTION_HANDLERS = {RequestValidationError: bad_request, StarletteHTTPException: http_error}


async def _guarded(endpoint: str, request: Request, work: Any, reshape: Any = None) -> Any:
    """Runs a handler unless the client leaves first, and counts the answer's status; ``reshape``
    (optional) rewrites its error responses into another API's shape."""
    response = await _unless_client_leaves(request, lambda: _answer(work))
    if reshape is not None:
        response = reshape(response)
    status = getattr(response, "status_code", 200)
    _context(request).metrics.requests.labels(endpoint, str(status)).inc()
    return response


def _error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


_BRANCH_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for a pydantic validation failure: the error deepest in the body (for a field that
    may take several shapes, the shape that got furthest), its location without union branch tags."""
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_branch_tag(part)]
    field = ".".join(loc) or None
    kind = first.get("type")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"{field} is not supported by this server (tandem serve); remove it from the request", field
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return (f"{field}: {message}" if field else message), field


def _is_branch_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _BRANCH_TAGS)


CLIENT_CLOSED = 499
"""Status logged for a request whose client left before the answer (nginx's convention); nobody reads it."""


async def _unless_client_leaves(request: Request, work: Any) -> Any:
    """Runs ``work`` but cancels it when the client disconnects first: a request still queued,
    prefilling or decoding without streaming then stops in the engine and frees its slot."""
    task = asyncio.ensure_future(work())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # lets the handler's cleanup (engine cancel, slot release) run to its end
        return Response(status_code=CLIENT_CLOSED)
    return task.result()


async def _disconnected(request: Request, every_s: float = 0.1) -> None:
    """Returns once the client has gone (a streamed response watches for this itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


async def _answer(work: Any) -> Any:
    """Runs a handler and maps what it raises to OpenAI error bodies; a stream becomes an SSE response."""
    try:
        result = await work()
    except ModelNotFound as exc:
        return _error(404, str(exc), "not_found_error", param="model", code="model_not_found")
    except GenerationFailed as exc:
        return _error(500, str(exc), "server_error")
    except ContextLengthError as exc:
        return _error(400, str(exc), param="messages", code="context_length_exceeded")
    except (EngineError, ValueError) as exc:
        return _error(400, str(exc))
    except ServerBusy as exc:
        return _error(503, str(exc), "server_busy", code="server_busy")
    except Exception as exc:  # noqa: BLE001 - anything else is our failure, not the client's: 5xx
        return _error(500, f"internal error: {exc}", "server_error")
    if isinstance(result, Streamed):
        return _SlotStream(result)
    return result


class _SlotStream(StreamingResponse):
    """A streamed response that gives back its admission slots however it ends, started or not."""

    def __init__(self, streamed: Streamed) -> None:
        super().__init__(streamed.lines, media_type="text/event-stream")
        self._release = streamed.release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
