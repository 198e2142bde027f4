"""Anthropic's Messages API as a thin translation onto the chat-completions handler.

A ``/v1/messages`` body becomes a :class:`ChatCompletionRequest`, runs through
:func:`handlers.chat_completion` (the one generation path), and its answer (whole or streamed) is
translated back. Which stop sequence ended an answer is read from the generated tokens themselves
(the request asks the handler for their log-probabilities, which carry each token's bytes): the
engine's stop filter cuts the text at the first stop string it sees, so the earliest stop string in
the raw output is the one that fired, and none there means the model ended its turn by itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tandemlm.deploy.server.anthropic_schemas import (
    CountTokensRequest,
    MessagesRequest,
    ToolResultBlock,
    ToolUseBlock,
    anthropic_error_body,
)
from tandemlm.deploy.server.context import ServeContext
from tandemlm.deploy.server.handlers import Streamed, chat_completion, chat_prompt_tokens
from tandemlm.deploy.server.responses import new_id
from tandemlm.deploy.server.schemas import ChatCompletionRequest

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


# ---- request ---------------------------------------------------------------------------------------
def chat_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape: system first, tool calls and results as their own turns."""
    out: list[dict[str, Any]] = []
    system = body.system_text()
    if system:
        out.append({"role": "system", "content": system})
    for message in body.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant_turn(message.content))
        else:
            out.extend(_user_turns(message.content))
    return out


def _assistant_turn(blocks: list[Any]) -> dict[str, Any]:
    text = "".join(block.text for block in blocks if block.type == "text")
    calls = [
        {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": json.dumps(block.input)}}
        for block in blocks
        if isinstance(block, ToolUseBlock)
    ]
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def _user_turns(blocks: list[Any]) -> list[dict[str, Any]]:
    """Tool results become ``tool`` turns; runs of text between them become one user turn each (order kept)."""
    turns: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            # OpenAI's tool turn has no error flag: say it in the content, where the model reads it.
            content = f"Error: {block.text()}" if block.is_error else block.text()
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        elif turns and turns[-1]["role"] == "user":
            turns[-1]["content"] += block.text
        else:
            turns.append({"role": "user", "content": block.text})
    return turns


def _tool_fields(body: MessagesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}
            for t in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        named = {"type": "function", "function": {"name": choice.name}}
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    return fields


def to_chat_request(body: MessagesRequest) -> ChatCompletionRequest:
    """The chat-completions request that answers ``body``; ValueError names what does not translate."""
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body),
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "stream": body.stream,
        **_tool_fields(body),
    }
    if body.stream:
        fields["stream_options"] = {"include_usage": True}  # Anthropic's stream ends with the usage
    if body.stop_sequences:
        # The generated tokens (carried by their log-probabilities) tell which stop sequence fired.
        fields |= {"stop": body.stop_sequences, "logprobs": True}
    return validated_chat_request(fields)


def validated_chat_request(fields: dict[str, Any]) -> ChatCompletionRequest:
    """A chat request from ``fields`` (None values left out); ValueError names the field that does not fit."""
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}" if where else message) from exc


def matched_stop(raw: bytes, stops: list[str] | None) -> str | None:
    """The stop sequence that ended a generation whose tokens' bytes are ``raw``, or None (it ended
    on its own). The engine stops at the first token that completes a stop string and cuts the text
    where the earliest one starts, so that one is earliest here too (ties: the first listed)."""
    text = raw.decode("utf-8", "replace")
    found = [(text.find(stop), order, stop) for order, stop in enumerate(stops or []) if stop in text]
    return min(found)[2] if found else None


def _stop_fields(finish: str | None, raw: bytes, stops: list[str] | None) -> dict[str, Any]:
    stop = matched_stop(raw, stops) if finish == "stop" else None
    if stop is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop}
    return {"stop_reason": STOP_REASONS.get(finish or "stop", "end_turn"), "stop_sequence": None}


def _token_bytes(logprobs: dict[str, Any] | None) -> bytes:
    return b"".join(bytes(entry.get("bytes") or []) for entry in (logprobs or {}).get("content") or [])


# ---- response --------------------------------------------------------------------------------------
def _tool_input(arguments: str) -> dict[str, Any]:
    # A call cut by max_tokens has unfinished arguments: no input can be read from them.
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def to_message(chat: dict[str, Any], stops: list[str] | None) -> dict[str, Any]:
    """A whole ``chat.completion`` body as an Anthropic ``message``."""
    choice = chat["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        # Anthropic signs its own thinking; a local model's has no signature to give.
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call["function"]
        content.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": _tool_input(function["arguments"])})
    usage = chat.get("usage") or {}
    return {
        "id": new_id("msg", sep="_"),
        "type": "message",
        "role": "assistant",
        "model": chat["model"],
        "content": content,
        **_stop_fields(choice["finish_reason"], _token_bytes(choice.get("logprobs")), stops),
        "usage": {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)},
    }


async def create_message(ctx: ServeContext, body: MessagesRequest) -> Any:
    """Answers a Messages request through :func:`chat_completion`: a message body, or a :class:`Streamed` of events."""
    chat = to_chat_request(body)
    if body.stop_sequences:
        _, engine = ctx.resolve(body.model)
        if "logprobs" not in engine.features:
            raise ValueError(
                f"stop_sequences is not supported for model {body.model!r}: its backend does not report the "
                "generated tokens, which this server reads to tell which stop sequence ended the answer"
            )
    result = await chat_completion(ctx, chat)
    if isinstance(result, Streamed):
        return Streamed(_events(result.lines, body.stop_sequences), result.release)
    return to_message(result, body.stop_sequences)


async def count_tokens(ctx: ServeContext, body: CountTokensRequest) -> dict[str, int]:
    """``/v1/messages/count_tokens``: the prompt tokens a Messages request with this body would prefill."""
    return {"input_tokens": await chat_prompt_tokens(ctx, to_chat_request(body))}


def reshape_error(response: Any) -> Any:
    """An OpenAI error response of the shared handlers, as Anthropic's error shape (same status)."""
    if not isinstance(response, JSONResponse) or response.status_code < 400:
        return response
    error = json.loads(bytes(response.body)).get("error") or {}
    return JSONResponse(anthropic_error_body(response.status_code, str(error.get("message", ""))), status_code=response.status_code)


# ---- streaming -------------------------------------------------------------------------------------
def event(kind: str, payload: dict[str, Any]) -> str:
    """One SSE event as Anthropic sends it: an ``event:`` line naming the type, then the data."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


class _Blocks:
    """Opens and closes content blocks as the kind of streamed text changes (thinking, text, a tool call)."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def open(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.close()
        self.index, self.kind = self.index + 1, kind
        return [*events, event("content_block_start", {"index": self.index, "content_block": block})]

    def ensure(self, kind: str, block: dict[str, Any]) -> list[str]:
        return [] if self.kind == kind else self.open(kind, block)

    def delta(self, payload: dict[str, Any]) -> str:
        return event("content_block_delta", {"index": self.index, "delta": payload})

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", {"index": self.index})]


def _chunk_events(blocks: _Blocks, delta: dict[str, Any]) -> list[str]:
    """The events for one chat chunk's delta, in the order the chat stream writes its parts."""
    out: list[str] = []
    if delta.get("reasoning_content"):
        out += blocks.ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        out.append(blocks.delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]}))
    if delta.get("content"):
        out += blocks.ensure("text", {"type": "text", "text": ""})
        out.append(blocks.delta({"type": "text_delta", "text": delta["content"]}))
    for call in delta.get("tool_calls") or []:
        function = call.get("function") or {}
        if call.get("id"):  # a call's first delta carries its id and name
            out += blocks.open("tool_use", {"type": "tool_use", "id": call["id"], "name": function.get("name", ""), "input": {}})
        if function.get("arguments"):
            out.append(blocks.delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
    return out


async def _events(lines: AsyncIterator[str], stops: list[str] | None) -> AsyncIterator[str]:
    """The chat handler's SSE lines as Anthropic's event sequence; closing this closes them (engine
    cancel; the slots are freed by the Streamed's release, which the response runs however it ends)."""
    blocks, raw, finish, usage, model = _Blocks(), bytearray(), None, {}, ""
    started = False
    try:
        async for line in lines:
            data = line.removeprefix("data: ").strip()
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:  # the handler reports a failure after the start in-band
                yield event("error", {"error": anthropic_error_body(500, chunk["error"].get("message", ""))["error"]})
                return
            model = chunk.get("model", model)
            if not started:
                started = True
                # The prompt's token count comes with the stream's end; message_delta carries it then.
                message = {"id": new_id("msg", sep="_"), "type": "message", "role": "assistant", "model": model, "content": [],
                           "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
                yield event("message_start", {"message": message})
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                raw += _token_bytes(choice.get("logprobs"))
                finish = choice.get("finish_reason") or finish
                for out in _chunk_events(blocks, choice.get("delta") or {}):
                    yield out
        for out in blocks.close():
            yield out
        tokens = {"input_tokens": usage.get("prompt_tokens", 0), "output_tokens": usage.get("completion_tokens", 0)}
        yield event("message_delta", {"delta": _stop_fields(finish, bytes(raw), stops), "usage": tokens})
        yield event("message_stop", {})
    finally:
        await lines.aclose()  # type: ignore[attr-defined]
