"""Routes that show what the server would do: models, tokenizing and the rendered chat prompt.

``/tokenize``, ``/detokenize`` and ``/apply-template`` take the same bodies as llama.cpp's and
vLLM's servers (at the root, as theirs are), so tools written for those work here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.context import ModelNotFound, ServeContext
from tandemlm.deploy.server.schemas import DetokenizeRequest, TokenizeRequest, error_body
from tandemlm.deploy.tool_use import plan_tools
from tandemlm.errors import EngineError


def _model_card(name: str, engine: Engine) -> dict[str, Any]:
    info = engine.info
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": f"tandemlm/{info.backend}",
        "max_model_len": info.context_length,
    }
    parent = getattr(engine, "parent", None)  # an adapter view: the served name of its base model
    if isinstance(parent, str):
        card["parent"] = parent
    return card


def _render(engine: Engine, body: TokenizeRequest) -> str:
    """The prompt a chat request with these messages and tools gets (tools as the server presents them)."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    plan = plan_tools(engine.chat_template_source(), tools, "auto")
    messages = plan.messages([m.as_message() for m in body.messages or []])
    return engine.render_chat(messages, add_generation_prompt=body.add_generation_prompt, tools=plan.template_tools)


def add_introspection_routes(app: FastAPI, ctx: ServeContext) -> None:
    """Adds ``/v1/models``, ``/v1/models/{id}``, ``/tokenizer_info``, ``/tokenize``, ``/detokenize`` and ``/apply-template``."""

    async def answer(work: Any) -> Any:
        try:
            return await ctx.prepare(work)
        except ModelNotFound as exc:
            return JSONResponse(error_body(str(exc), "not_found_error", "model", "model_not_found"), status_code=404)
        except (EngineError, ValueError) as exc:
            return JSONResponse(error_body(str(exc)), status_code=400)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name, engine) for name, engine in ctx.engines.items()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        def work() -> dict[str, Any]:
            if model_id not in ctx.engines:
                raise ModelNotFound(f"model {model_id!r} is not served here; served models: {', '.join(ctx.engines)}")
            return _model_card(model_id, ctx.engines[model_id])

        return await answer(work)

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> Any:
        # What lm-eval's remote tokenizer reads; with /tokenize and /detokenize it needs no local tokenizer.
        def work() -> dict[str, Any]:
            _, engine = ctx.resolve(model)
            return {**engine.special_tokens(), "chat_template": engine.chat_template_source()}

        return await answer(work)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:
        def work() -> dict[str, Any]:
            _, engine = ctx.resolve(body.model)
            if body.prompt is not None:
                tokens = engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
            else:  # a rendered chat prompt carries its special tokens already
                tokens = engine.tokenize(_render(engine, body), add_special_tokens=False)
            return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.info.context_length}

        return await answer(work)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:
        def work() -> dict[str, Any]:
            _, engine = ctx.resolve(body.model)
            return {"prompt": engine.detokenize(engine.check_token_ids(body.tokens))}

        return await answer(work)

    @app.post("/apply-template")
    async def apply_template(body: TokenizeRequest) -> Any:
        def work() -> dict[str, Any]:
            if body.messages is None:
                raise ValueError("messages is required")
            _, engine = ctx.resolve(body.model)
            return {"prompt": _render(engine, body)}

        return await answer(work)
