"""What a model is told and held to about tools: the system message for templates without tool
support, call arguments in the shape templates read, the JSON schema that forces a call under
``tool_choice``, and the checks of a request's ``tools``. Reading calls back is :mod:`.tools`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from tandemlm.deploy.tools import json_or_none

# Templates without tool support ----------------------------------------------------------------


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """A system message for templates that cannot list tools: the tools, and the exact JSON reply
    that the ``json`` parser reads as calls."""
    lines = ["You can call the following functions (tools):", ""]
    for tool in tools:
        function = tool["function"]
        lines.append(f"- {function['name']}: {function.get('description') or '(no description)'}")
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        lines.append(f"  arguments (JSON schema): {json.dumps(schema, ensure_ascii=False)}")
    lines += [
        "",
        "To call a function, reply with only this JSON object and nothing else:",
        '{"name": "<function name>", "arguments": {<the arguments as a JSON object>}}',
        "To call several functions at once, reply with only:",
        '{"tool_calls": [{"name": "<function name>", "arguments": {...}}, ...]}',
        "Function results come back in later messages. If no function is needed, answer in plain text.",
    ]
    return "\n".join(lines)


class TemplateArguments(dict):
    """A call's arguments for chat templates: an object to ``tojson`` (Qwen, Llama, R1), and its JSON
    text when a template joins it to strings with ``+`` or prints it (DeepSeek-V3's own template)."""

    def __init__(self, value: dict[str, Any], text: str | None = None) -> None:
        super().__init__(value)
        self.text = text if text is not None else json.dumps(value, ensure_ascii=False)

    def __str__(self) -> str:
        return self.text

    def __add__(self, other: object) -> str:
        return self.text + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other: object) -> str:
        return other + self.text if isinstance(other, str) else NotImplemented


def messages_for_template(messages: Sequence[dict[str, Any]], native: bool = True) -> list[dict[str, Any]]:
    """``messages`` with each assistant tool call's ``arguments`` (OpenAI's JSON text, or an object) as
    :class:`TemplateArguments`, which every template's way of writing them accepts.

    ``native=False`` is for templates without tool support, which would drop the calls: they go into
    the assistant's content instead, as the JSON reply :func:`tools_system_prompt` asks for.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") != "assistant" or not isinstance(calls, list) or not calls:
            out.append(dict(message))
        elif native:
            out.append(dict(message, tool_calls=[_template_call(call) for call in calls]))
        else:
            written = [_template_call(call).get("function", {}) for call in calls if isinstance(call, dict)]
            reply = json.dumps(written[0] if len(written) == 1 else {"tool_calls": written}, ensure_ascii=False)
            content = "\n".join(part for part in (message.get("content") or "", reply) if part)
            out.append({k: v for k, v in message.items() if k != "tool_calls"} | {"content": content})
    return out


def _template_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    args = function.get("arguments")
    if isinstance(args, str):
        value = json_or_none(args or "{}")
        args = TemplateArguments(value, args) if isinstance(value, dict) else args  # bad JSON: left as sent
    elif isinstance(args, dict):
        args = TemplateArguments(args)
    return dict(call, function=dict(function, arguments=args))


# Forced calls (tool_choice "required" or a named function) ------------------------------------


def forced_call_schema(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any], parallel: bool) -> dict | None:
    """The JSON schema decoding must follow when ``tool_choice`` forces a call; None for "auto"/"none".

    One call is ``{"name": <const>, "arguments": <that tool's parameters>}`` (``anyOf`` over the tools);
    ``parallel`` with "required" allows a non-empty array of them.
    """
    if isinstance(tool_choice, dict):
        wanted = tool_choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == wanted]
    elif tool_choice == "required":
        chosen = tools
    else:
        return None
    defs: dict[str, Any] = {}
    options = [_call_schema(tool["function"], f"t{i}_", defs) for i, tool in enumerate(chosen)]
    one = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {"type": "array", "items": one, "minItems": 1} if parallel and tool_choice == "required" else one
    return {**schema, "$defs": defs} if defs else schema


def _call_schema(function: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    params = dict(function.get("parameters") or {"type": "object", "properties": {}})
    # Definitions move to the root, renamed per tool, so "#/$defs/…" references still resolve there.
    for key in ("$defs", "definitions"):
        for name, sub in (params.pop(key, None) or {}).items():
            defs[prefix + name] = _rewrite_refs(sub, prefix)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": _rewrite_refs(params, prefix)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rewrite_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, list):
        return [_rewrite_refs(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rewrite_refs(value, prefix) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str):
        out["$ref"] = re.sub(r"^#/(?:\$defs|definitions)/", f"#/$defs/{prefix}", ref)
    return out


# Request checks --------------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def validate_tools(tools: Any, tool_choice: Any) -> None:
    """Checks OpenAI ``tools`` and ``tool_choice``; ValueError names the bad field."""
    if tools is not None and not isinstance(tools, list):
        raise ValueError("tools must be a list")
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        names.append(_check_tool(tool, f"tools[{i}]", names))
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise ValueError("tool_choice 'required' needs tools")
        return
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or tool_choice.get("type", "function") != "function":
        raise ValueError(
            'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'
        )
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("tool_choice.function.name is required")
    if name not in names:
        raise ValueError(f"tool_choice names function {name!r} which is not in tools")


def _check_tool(tool: Any, where: str, seen: list[str]) -> str:
    if not isinstance(tool, dict):
        raise ValueError(f"{where} must be an object")
    if tool.get("type", "function") != "function":
        raise ValueError(f"{where}.type must be 'function', got {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function is required")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.function.name is required")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_', '-', '.' or ':', got {name!r}")
    if name in seen:
        raise ValueError(f"{where}.function.name {name!r} is already used by another tool")
    if function.get("description") is not None and not isinstance(function["description"], str):
        raise ValueError(f"{where}.function.description must be a string")
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
        raise ValueError(f"{where}.function.parameters must be a JSON schema object")
    return name
