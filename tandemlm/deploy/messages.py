"""OpenAI-style chat messages checked and shaped for chat templates, with errors that name the bad message."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tandemlm.deploy.tool_specs import TemplateArguments
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Checks OpenAI-style messages and returns them as templates expect them; errors name the bad message.

    Assistant ``tool_calls`` keep OpenAI's shape with ``arguments`` parsed (as
    :class:`~tandemlm.deploy.tool_specs.TemplateArguments`); ``tool`` messages keep ``tool_call_id`` (and ``name``).
    """
    if not messages:
        raise EngineError("messages must contain at least one message")
    clean: list[Message] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise EngineError(f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise EngineError(f"{where}.role must be system, user, assistant or tool, got {role!r}")
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise EngineError(f"{where}.content must be a string")
        out: Message = {"role": role, "content": content}
        if calls:
            out["tool_calls"] = [_template_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)]
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(message.get(key), str):
                    out[key] = message[key]
        clean.append(out)
    return clean


def _template_tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise EngineError(f"{where}.function.name is required")
    arguments = function.get("arguments", "{}")
    text = arguments if isinstance(arguments, str) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise EngineError(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise EngineError(f"{where}.function.arguments must be a JSON object")
    # Templates either write arguments with `tojson` (Qwen, Llama) or join them as text (DeepSeek-V3):
    # TemplateArguments is a dict that also reads as its JSON text.
    arguments = TemplateArguments(arguments, text)
    return {
        "id": str(call.get("id") or ""),
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }
