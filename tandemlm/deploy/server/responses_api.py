"""OpenAI's Responses API as a thin translation onto the chat-completions handler.

A ``/v1/responses`` body becomes a :class:`ChatCompletionRequest`, runs through
:func:`handlers.chat_completion` (the one generation path), and its answer (whole or streamed) is
translated back into a ``response`` object, or the Responses event sequence. Nothing is stored:
each request carries its whole conversation in ``input``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from tandemlm.deploy.server.anthropic_api import event, validated_chat_request
from tandemlm.deploy.server.context import ServeContext
from tandemlm.deploy.server.handlers import Streamed, chat_completion
from tandemlm.deploy.server.responses import new_id
from tandemlm.deploy.server.responses_api_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponsesRequest,
)
from tandemlm.deploy.server.schemas import ChatCompletionRequest


# ---- request ---------------------------------------------------------------------------------------
def chat_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation in chat shape: instructions first, function calls joined onto the assistant
    turn before them, their outputs as ``tool`` turns (order kept)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            # Parallel calls come as consecutive items (after the answer's text, if any): in chat they are one assistant turn.
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": "", "tool_calls": []})
            out[-1].setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        # Reasoning items are left out of the prompt (see ReasoningItem).
    return out


def _tool_fields(body: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"parallel_tool_calls": body.parallel_tool_calls}
    if body.tools:
        fields["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in body.tools
        ]
    choice = body.tool_choice
    if isinstance(choice, str):
        fields["tool_choice"] = choice
    elif choice is not None:
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    return fields


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    form = body.text.format if body.text else None
    if form is None or form.type != "json_schema":
        return None if form is None else {"type": form.type}
    spec = {"name": form.name, "description": form.description, "schema": form.schema_, "strict": form.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


def to_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat-completions request that answers ``body``; ValueError names what does not translate."""
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body),
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "response_format": _response_format(body),
        "user": body.user,
        **_tool_fields(body),
    }
    if body.stream:
        fields["stream_options"] = {"include_usage": True}  # the final response event carries the usage
    return validated_chat_request(fields)


# ---- response --------------------------------------------------------------------------------------
def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    """A ``reasoning`` output item holding the model's own thinking (no summary is made of it)."""
    return {"id": new_id("rs", sep="_"), "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    """An assistant ``message`` output item with one ``output_text`` part."""
    return {"id": new_id("msg", sep="_"), "type": "message", "role": "assistant", "status": status, "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item; ``call_id`` is what the client's ``function_call_output`` names."""
    return {"id": new_id("fc", sep="_"), "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def output_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat answer's message as output items, in the order the model wrote them."""
    items = [reasoning_item(message["reasoning_content"])] if message.get("reasoning_content") else []
    if message.get("content"):
        items.append(message_item(message["content"]))
    for call in message.get("tool_calls") or []:
        items.append(call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
    return items


def usage_json(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat usage in the Responses shape. Reasoning tokens are counted in ``output_tokens`` but not
    apart (the chat handler does not split them), so ``reasoning_tokens`` is 0."""
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def response_body(
    body: ResponsesRequest, head: dict[str, Any], output: list[dict[str, Any]], status: str, usage: dict[str, Any] | None
) -> dict[str, Any]:
    """The ``response`` object: ``head`` (id, created_at, model), the output, and the request's settings echoed."""
    choice = body.tool_choice
    form = body.text.format if body.text and body.text.format else None
    return {
        **head,
        "object": "response",
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": body.temperature,
        "text": {"format": form.model_dump(by_alias=True, exclude_none=True) if form else {"type": "text"}},
        "tool_choice": choice.model_dump() if choice is not None and not isinstance(choice, str) else (choice or "auto"),
        "tools": [tool.model_dump() for tool in body.tools or []],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": usage_json(usage) if usage is not None else None,
        "user": body.user,
    }


def _head(model: str) -> dict[str, Any]:
    return {"id": new_id("resp", sep="_"), "created_at": int(time.time()), "model": model}


def to_response(body: ResponsesRequest, chat: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion`` body as a ``response`` object."""
    choice = chat["choices"][0]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    items = output_items(choice["message"])
    if items and status == "incomplete":
        items[-1]["status"] = "incomplete"  # the item the cut fell in; those before it were finished
    return response_body(body, _head(chat["model"]), items, status, chat.get("usage") or {})


async def create_response(ctx: ServeContext, body: ResponsesRequest) -> Any:
    """Answers a Responses request through :func:`chat_completion`: a response body, or a :class:`Streamed` of events."""
    result = await chat_completion(ctx, to_chat_request(body))
    if isinstance(result, Streamed):
        return Streamed(_events(body, result.lines), result.release)
    return to_response(body, result)


# ---- streaming -------------------------------------------------------------------------------------
class _Output:
    """The output items of a streamed response: opens and closes them as the kind of streamed text
    changes (reasoning, text, a function call), writing each event with its ``sequence_number``."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.kind: str | None = None  # the open item's kind
        self.sequence = 0

    def emit(self, kind: str, payload: dict[str, Any]) -> str:
        line = event(kind, {**payload, "sequence_number": self.sequence})
        self.sequence += 1
        return line

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1}

    def open(self, kind: str, item: dict[str, Any]) -> list[str]:
        events = self.close("completed")  # a new item starts: the one before was finished
        self.items.append(item)
        self.kind = kind
        events.append(self.emit("response.output_item.added", {"output_index": len(self.items) - 1, "item": _opened(item)}))
        if kind == "message":
            part = _text_part("")
            events.append(self.emit("response.content_part.added", {**self._where(), "content_index": 0, "part": part}))
        elif kind == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            events.append(self.emit("response.content_part.added", {**self._where(), "content_index": 0, "part": part}))
        return events

    def text(self, kind: str, text: str) -> list[str]:
        """Appends streamed reasoning or answer text to an item of ``kind`` (opened when needed)."""
        make = reasoning_item if kind == "reasoning" else message_item
        events = [] if self.kind == kind else self.open(kind, make("", "in_progress"))
        self.items[-1]["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [*events, self.emit(name, {**self._where(), "content_index": 0, "delta": text, **extra})]

    def call(self, delta: dict[str, Any]) -> list[str]:
        """A chat tool-call delta: its first one (with the id) opens a function_call item."""
        function = delta.get("function") or {}
        events = self.open("function_call", call_item(delta["id"], function.get("name", ""), "", "in_progress")) if delta.get("id") else []
        if function.get("arguments") and self.kind == "function_call":
            self.items[-1]["arguments"] += function["arguments"]
            events.append(self.emit("response.function_call_arguments.delta", {**self._where(), "delta": function["arguments"]}))
        return events

    def close(self, status: str) -> list[str]:
        """Ends the open item (if any) with ``status``: its done events, last the whole item."""
        if self.kind is None:
            return []
        item, where, events = self.items[-1], self._where(), []
        if self.kind in ("message", "reasoning"):
            part = item["content"][0]
            done = "response.output_text.done" if self.kind == "message" else "response.reasoning_text.done"
            extra = {"logprobs": []} if self.kind == "message" else {}
            events.append(self.emit(done, {**where, "content_index": 0, "text": part["text"], **extra}))
            events.append(self.emit("response.content_part.done", {**where, "content_index": 0, "part": part}))
        else:
            events.append(self.emit("response.function_call_arguments.done", {**where, "arguments": item["arguments"]}))
        item["status"] = status
        self.kind = None
        return [*events, self.emit("response.output_item.done", {"output_index": where["output_index"], "item": item})]


def _opened(item: dict[str, Any]) -> dict[str, Any]:
    # An item is announced empty: its text parts follow as content_part.added.
    return {**item, "content": []} if item["type"] in ("message", "reasoning") else dict(item)


async def _events(body: ResponsesRequest, lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The chat handler's SSE lines as the Responses event sequence; closing this closes them (engine
    cancel; the slots are freed by the Streamed's release, which the response runs however it ends)."""
    out, finish, usage, head = _Output(), None, {}, None
    try:
        async for line in lines:
            data = line.removeprefix("data: ").strip()
            if not data or data == "[DONE]":
                continue
            chunk = json.loads(data)
            if head is None:
                head = _head(chunk.get("model", body.model))
                for kind in ("response.created", "response.in_progress"):
                    yield out.emit(kind, {"response": response_body(body, head, [], "in_progress", None)})
            if "error" in chunk:  # the handler reports a failure after the start in-band
                failed = response_body(body, head, out.items, "failed", None)
                failed["error"] = {"code": "server_error", "message": chunk["error"].get("message", "")}
                yield out.emit("response.failed", {"response": failed})
                return
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                for piece in _chunk_events(out, choice.get("delta") or {}):
                    yield piece
        status = "incomplete" if finish == "length" else "completed"
        for piece in out.close(status):
            yield piece
        final = response_body(body, head or _head(body.model), out.items, status, usage)
        yield out.emit(f"response.{status}", {"response": final})
    finally:
        await lines.aclose()  # type: ignore[attr-defined]


def _chunk_events(out: _Output, delta: dict[str, Any]) -> list[str]:
    """The events for one chat chunk's delta, in the order the chat stream writes its parts."""
    events: list[str] = []
    if delta.get("reasoning_content"):
        events += out.text("reasoning", delta["reasoning_content"])
    if delta.get("content"):
        events += out.text("message", delta["content"])
    for call in delta.get("tool_calls") or []:
        events += out.call(call)
    return events
