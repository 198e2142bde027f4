"""Handlers that show what the server would do: models, tokenizing and the rendered chat prompt.

``/tokenize``, ``/detokenize`` and ``/apply-template`` take the same bodies as llama.cpp's and
vLLM's servers (at the root, as theirs are), so tools written for those work here. The routes
(and the mapping of what these raise to error bodies) are in :mod:`.routes`.
"""

from __future__ import annotations

from typing import Any

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.server.context import ModelNotFound, ServeContext
from tandemlm.deploy.server.schemas import DetokenizeRequest, TokenizeRequest
from tandemlm.deploy.tool_use import plan_tools


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


def list_models(ctx: ServeContext) -> dict[str, Any]:
    """``/v1/models``: a card per served model."""
    return {"object": "list", "data": [_model_card(name, engine) for name, engine in ctx.engines.items()]}


async def model_card(ctx: ServeContext, model_id: str) -> dict[str, Any]:
    """``/v1/models/{id}``: the served model's card; ModelNotFound otherwise."""

    def work() -> dict[str, Any]:
        if model_id not in ctx.engines:
            raise ModelNotFound(f"model {model_id!r} is not served here; served models: {', '.join(ctx.engines)}")
        return _model_card(model_id, ctx.engines[model_id])

    return await ctx.prepare(work)


async def tokenizer_info(ctx: ServeContext, model: str | None) -> dict[str, Any]:
    """``/tokenizer_info``: special tokens and chat template (what lm-eval's remote tokenizer reads;
    with /tokenize and /detokenize it needs no local tokenizer)."""

    def work() -> dict[str, Any]:
        _, engine = ctx.resolve(model)
        return {**engine.special_tokens(), "chat_template": engine.chat_template_source()}

    return await ctx.prepare(work)


async def tokenize(ctx: ServeContext, body: TokenizeRequest) -> dict[str, Any]:
    """``/tokenize``: the token ids of a prompt, or of the chat prompt its messages render to."""

    def work() -> dict[str, Any]:
        _, engine = ctx.resolve(body.model)
        if body.prompt is not None:
            tokens = engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
        else:  # a rendered chat prompt carries its special tokens already
            tokens = engine.tokenize(_render(engine, body), add_special_tokens=False)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.info.context_length}

    return await ctx.prepare(work)


async def detokenize(ctx: ServeContext, body: DetokenizeRequest) -> dict[str, Any]:
    """``/detokenize``: the text of token ids (each checked against the vocabulary)."""

    def work() -> dict[str, Any]:
        _, engine = ctx.resolve(body.model)
        return {"prompt": engine.detokenize(engine.check_token_ids(body.tokens))}

    return await ctx.prepare(work)


async def apply_template(ctx: ServeContext, body: TokenizeRequest) -> dict[str, Any]:
    """``/apply-template``: the prompt text the chat template makes of the messages (and tools)."""

    def work() -> dict[str, Any]:
        if body.messages is None:
            raise ValueError("messages is required")
        _, engine = ctx.resolve(body.model)
        return {"prompt": _render(engine, body)}

    return await ctx.prepare(work)
