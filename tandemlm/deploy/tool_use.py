"""How one chat request uses tools: what the template sees, what constrains decoding, how output is parsed.

- ``tool_choice="none"``: the tools are left out of the prompt and nothing is parsed.
- ``"auto"`` (the default with tools): the model's own template lists the tools (or, for a template
  without tool support, a system message written by :func:`~tandemlm.deploy.tool_specs.tools_system_prompt`),
  and its output is parsed by the parser for that template's format.
- ``"required"`` or a named function: decoding is constrained to a JSON call (grammar-enforced, so
  even a small model emits a valid one), then read back into ``tool_calls``; a call ``max_tokens`` cut
  short comes back as the calls written so far (the last one's arguments as far as they go), never as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tandemlm.deploy.tool_specs import forced_call_schema, messages_for_template, tools_system_prompt, validate_tools
from tandemlm.deploy.tools import (
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolStream,
    calls_from_forced_json,
    get_parser,
    new_call_id,
    parser_for,
    template_supports_tools,
)
from tandemlm.deploy.types import OutputConstraint
from tandemlm.models.chat_template import Message


@dataclass(frozen=True)
class ToolPlan:
    """The tools part of a request, decided once; :meth:`choice` makes each choice's output reader."""

    template_tools: list[dict[str, Any]] | None = None  # given to the chat template's `tools` variable
    system_prompt: str | None = None  # for templates that cannot list tools themselves
    constraint: OutputConstraint | None = None
    parser: ToolParser | None = None
    native: bool = True  # the template writes tools and past tool calls itself
    parallel: bool = True  # parallel_tool_calls=false: a reply carries at most one call
    forced_names: tuple[str, ...] = ()  # the tools a forced call may name

    @property
    def active(self) -> bool:
        return self.parser is not None or self.constraint is not None

    def messages(self, messages: Sequence[Message]) -> list[Message]:
        """``messages`` as this template needs them: past tool calls written into the assistant's
        content and a tool-describing system message added, when it cannot do either itself."""
        messages = messages_for_template(messages, native=self.native)
        if not self.system_prompt:
            return messages
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0], content=f"{messages[0]['content']}\n\n{self.system_prompt}")
            return [first, *messages[1:]]
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def choice(self) -> ChoiceTools:
        return ChoiceTools(self)


def plan_tools(
    chat_template: str | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel: bool = True,
) -> ToolPlan:
    """Decides how a request with ``tools`` and ``tool_choice`` (OpenAI shapes) is served; ValueError names a bad field."""
    native = template_supports_tools(chat_template)
    if not tools or tool_choice == "none":
        return ToolPlan(native=native)
    choice = tool_choice if tool_choice is not None else "auto"
    validate_tools(tools, choice)
    template_tools = tools if native else None
    system_prompt = None if native else tools_system_prompt(tools)
    schema = forced_call_schema(tools, choice, parallel)
    if schema is not None:
        names = [choice["function"]["name"]] if isinstance(choice, dict) else [t["function"]["name"] for t in tools]
        constraint = OutputConstraint(json_schema=schema)
        return ToolPlan(template_tools, system_prompt, constraint, native=native, forced_names=tuple(names))
    parser = parser_for(chat_template) if native else get_parser("json")
    return ToolPlan(template_tools, system_prompt, parser=parser, native=native, parallel=parallel)


class ChoiceTools:
    """Turns one choice's answer text into content and tool-call deltas, as it streams."""

    def __init__(self, plan: ToolPlan) -> None:
        self._forced = plan.constraint is not None and plan.parser is None
        self._names = plan.forced_names
        self.cut = False  # a forced call that ended before it was whole
        self._stream: ToolStream | None = plan.parser.streamer() if plan.parser else None
        self._held: list[str] = []
        self._limit = None if plan.parallel else 1
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self._forced:
            self._held.append(text)  # a forced call is read whole at the end
            return "", []
        if self._stream is None:
            return text, []
        content, deltas = self._stream.feed(text)
        return content, self._allowed(deltas)

    def _allowed(self, deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
        # Without parallel calls only the first call the model writes is the answer's.
        return deltas if self._limit is None else [d for d in deltas if d.index < self._limit]

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        if self._forced:
            text = "".join(self._held)
            calls = calls_from_forced_json(text)
            if not calls:  # cut short (max_tokens) before the call was complete: the calls so far
                calls, self.cut = cut_forced_calls(text, self._names), True
                if not calls:  # nothing names a tool yet (several share the start written so far)
                    return text, []
            self.calls = calls
            return "", [ToolCallDelta(i, call.id, call.name, call.arguments) for i, call in enumerate(calls)]
        if self._stream is None:
            return "", []
        content, deltas = self._stream.flush()
        self.calls = list(self._stream.calls)[: self._limit]
        return content, self._allowed(deltas)

    def finish_reason(self, ended: str) -> str:
        """The choice's finish reason once flushed, given how generation ``ended``: "tool_calls" for
        whole calls; a forced call cut short keeps the engine's reason ("length")."""
        return "tool_calls" if self.calls and not self.cut else ended


# Forced output cut short: the compact JSON of forced_call_schema, one call or an array of them, calls
# written "name" first (llguidance keeps the schema's property order).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_NAME_SO_FAR = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)(")?')
_BETWEEN_CALLS = re.compile(r"\s*\}?\s*,?\s*")


def cut_forced_calls(text: str, names: Sequence[str]) -> list[ToolCall]:
    """The calls in forced-call output cut short: each whole call, then the cut one with its arguments
    text as far as it goes (a name cut short is completed when only one of ``names`` starts that way)."""
    decoder, calls = json.JSONDecoder(), []
    pos = 1 if text.lstrip().startswith("[") else 0
    pos += len(text) - len(text.lstrip())
    while head := _CALL_HEAD.match(text, pos):
        try:
            _, end = decoder.raw_decode(text, head.end())
        except json.JSONDecodeError:  # the arguments are cut short
            return [*calls, ToolCall(new_call_id(), head.group(1), text[head.end() :])]
        calls.append(ToolCall(new_call_id(), head.group(1), text[head.end() : end]))
        pos = _BETWEEN_CALLS.match(text, end).end()  # type: ignore[union-attr]  # matches even nothing
    name = _name_so_far(text[pos:], names)
    return [*calls, ToolCall(new_call_id(), name, "")] if name else calls


def _name_so_far(rest: str, names: Sequence[str]) -> str | None:
    """The tool a call cut before its arguments names, if ``rest`` (a call's start) tells it."""
    if not rest.strip().startswith("{"):
        return None
    written = _NAME_SO_FAR.match(rest)
    if written is None:
        candidates = list(names)
    elif written.group(2):  # the name is whole
        candidates = [name for name in names if name == written.group(1)]
    else:
        candidates = [name for name in names if name.startswith(written.group(1))]
    return candidates[0] if len(candidates) == 1 else None
