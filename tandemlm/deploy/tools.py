"""OpenAI tool calling as pure functions: which format a chat template uses and reading calls out of
generated text (whole or streamed). What the model is told and held to is :mod:`.tool_specs`.

Formats, one parser each: ``hermes`` (``<tool_call>{json}</tool_call>``: Qwen, Hermes), ``deepseek_v3``
(``<｜tool▁calls▁begin｜>…``: DeepSeek-V3/R1/V3.1), ``llama3_json`` (the whole reply is
``{"name", "parameters"}``: Llama 3.1+) and ``json``, the fallback for templates without tool support,
which reads the reply format :func:`~tandemlm.deploy.tool_specs.tools_system_prompt` asks for. Streams follow
:mod:`tandemlm.deploy.textstream`: text streams out at once except what may still be a call.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tandemlm.deploy.textstream import _partial_suffix_len


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI sends it


@dataclass
class ToolCallDelta:
    """One streamed OpenAI tool-call delta; ``id`` and ``name`` are set on a call's first delta."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# Reading calls out of JSON values -----------------------------------------------------------


def _call_from_object(obj: Any) -> ToolCall | None:
    """``{"name": str, "arguments"|"parameters": object or JSON text of one}`` as a call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    # The arguments key is required, so that any JSON answer with a "name" is not taken for a call.
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        args = json_or_none(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # JSONDecodeError, and recursion too deep
        return None


def _calls_from_value(value: Any) -> list[ToolCall]:
    """Calls from a single call object, ``{"tool_calls": [...]}`` or a list of calls; [] unless all are valid."""
    if isinstance(value, dict) and set(value) == {"tool_calls"}:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_object(item) for item in items]
    return [c for c in calls if c is not None] if items and None not in calls else []


def _strip_fence(text: str) -> str:
    """``text`` without a surrounding Markdown code fence (```json … ```), if it has one."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        body = body[4:] if body.startswith("json") else body
    return body.strip()


# Streams --------------------------------------------------------------------------------------


class ToolStream:
    """Feed generated text pieces; get back ``(content_text, deltas)`` that are safe to emit now.

    ``calls`` holds the complete calls seen so far. The concatenated content and the calls come out the
    same for any split of the text into pieces, and the same as the parser's ``parse``.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        raise NotImplementedError

    def _emit(self, items: Sequence[ToolCall | str]) -> tuple[str, list[ToolCallDelta]]:
        """Content strings joined, and one delta per call (the whole arguments at once: a call is
        only known to be valid once it closes)."""
        content, deltas = [], []
        for item in items:
            if isinstance(item, str):
                content.append(item)
                continue
            deltas.append(ToolCallDelta(len(self.calls), item.id, item.name, item.arguments))
            self.calls.append(item)
        return "".join(content), deltas


class _TaggedStream(ToolStream):
    """Calls sit in ``open…close`` blocks anywhere in the text; everything outside them is content."""

    def __init__(self, parser: _TaggedParser) -> None:
        super().__init__()
        self.parser = parser
        self.pending = ""
        self.inside = False

    def feed(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        self.pending += piece
        items: list[ToolCall | str] = []
        open_tag, close_tag = self.parser.open, self.parser.close
        while True:
            if self.inside:
                end = self.pending.find(close_tag)
                if end < 0:
                    break  # hold the whole block until it closes
                items += self.parser.parse_block(self.pending[:end], closed=True)
                self.pending = self.pending[end + len(close_tag) :]
                self.inside = False
                continue
            start = self.pending.find(open_tag)
            if start < 0:
                hold = _partial_suffix_len(self.pending, open_tag)
                items.append(self.pending[: len(self.pending) - hold])
                self.pending = self.pending[len(self.pending) - hold :]
                break
            items.append(self.pending[:start])
            self.pending = self.pending[start + len(open_tag) :]
            self.inside = True
        return self._emit(items)

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        rest, self.pending = self.pending, ""
        # A block cut off by the end of generation still counts if its call reads whole.
        items = self.parser.parse_block(rest, closed=False) if self.inside else [rest]
        self.inside = False
        return self._emit(items)


class _WholeReplyStream(ToolStream):
    """The whole reply is either calls or content. A reply that starts like a call (``leads``) is held
    to the end and then read; any other reply streams as content at once."""

    def __init__(self, parser: _WholeReplyParser) -> None:
        super().__init__()
        self.parser = parser
        self.pending = ""
        self.mode = "deciding"  # then "held" or "content"

    def feed(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        if self.mode == "content":
            return piece, []
        self.pending += piece
        if self.mode == "deciding":
            head = self.pending.lstrip()
            if any(head.startswith(lead) for lead in self.parser.leads):
                self.mode = "held"
            elif head and not any(lead.startswith(head) for lead in self.parser.leads):
                self.mode = "content"
                out, self.pending = self.pending, ""
                return out, []
        return "", []

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        text, self.pending = self.pending, ""
        calls = self.parser.read_reply(text) if self.mode == "held" else []
        self.mode = "content"
        return self._emit(calls or [text])


# Parsers --------------------------------------------------------------------------------------


class ToolParser(Protocol):
    name: str

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content without the calls, calls)`` of a whole reply."""
        ...

    def streamer(self) -> ToolStream: ...


class _Parser:
    name = ""

    def streamer(self) -> ToolStream:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a whole reply: the stream fed all at once, so the two cannot disagree."""
        stream = self.streamer()
        content, _ = stream.feed(text)
        rest, _ = stream.flush()
        return content + rest, list(stream.calls)


class _TaggedParser(_Parser):
    open = ""
    close = ""

    def parse_block(self, body: str, closed: bool) -> list[ToolCall | str]:
        """Calls and leftover content from one block's ``body``; a malformed call stays as raw text."""
        raise NotImplementedError

    def raw(self, body: str, closed: bool) -> str:
        return self.open + body + (self.close if closed else "")

    def streamer(self) -> ToolStream:
        return _TaggedStream(self)


class HermesParser(_TaggedParser):
    """``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>``, any number, anywhere."""

    name = "hermes"
    open = "<tool_call>"
    close = "</tool_call>"

    def parse_block(self, body: str, closed: bool) -> list[ToolCall | str]:
        call = _call_from_object(json_or_none(_strip_fence(body)))
        return [call] if call else [self.raw(body, closed)]


DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


class DeepSeekV3Parser(_TaggedParser):
    """One ``<｜tool▁calls▁begin｜>…<｜tool▁calls▁end｜>`` section of calls, each either V3's
    ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``, a newline and the arguments in a json code fence,
    or V3.1's ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{…}``."""

    name = "deepseek_v3"
    open = DS_CALLS_BEGIN
    close = DS_CALLS_END

    def parse_block(self, body: str, closed: bool) -> list[ToolCall | str]:
        head, *parts = body.split(DS_CALL_BEGIN)
        calls, stray = [], head
        for part in parts:
            inner, ended, after = part.partition(DS_CALL_END)
            # In a section cut off by the end of generation the last call may lack its end marker.
            call = self._call(inner) if ended or not closed else None
            if call is None:
                return [self.raw(body, closed)]  # the section stays whole rather than half read
            calls.append(call)
            stray += after
        return [*calls] if calls and not stray.strip() else [self.raw(body, closed)]

    @staticmethod
    def _call(inner: str) -> ToolCall | None:
        left, sep, right = inner.partition(DS_SEP)
        if not sep:
            return None
        name, args = left.strip(), right
        if name == "function" and not right.lstrip().startswith("{"):  # V3: the type, then NAME on its own line
            name, _, args = right.partition("\n")
            name = name.strip()
        if not name:
            return None
        return _call_from_object({"name": name, "arguments": json_or_none(_strip_fence(args))})


class _WholeReplyParser(_Parser):
    leads: tuple[str, ...] = ()

    def read_reply(self, text: str) -> list[ToolCall]:
        """The calls the whole reply ``text`` makes, or [] when it is not (entirely) calls."""
        raise NotImplementedError

    def streamer(self) -> ToolStream:
        return _WholeReplyStream(self)


class Llama3JsonParser(_WholeReplyParser):
    """The reply is ``{"name": …, "parameters": {…}}`` (maybe after ``<|python_tag|>``), or several joined by ``;``."""

    name = "llama3_json"
    leads = ("{", "<|python_tag|>")

    def read_reply(self, text: str) -> list[ToolCall]:
        rest = text.strip().removeprefix("<|python_tag|>").strip()
        decoder, calls = json.JSONDecoder(), []
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                return []
            call = _call_from_object(obj)
            if call is None:
                return []
            calls.append(call)
            rest = rest[end:].lstrip()
            if rest and not rest.startswith(";"):
                return []
            rest = rest[1:].lstrip()
        return calls


class JsonParser(_WholeReplyParser):
    """The reply :func:`tools_system_prompt` asks for: ``{"name", "arguments"}`` or ``{"tool_calls": […]}``,
    maybe in a ```json fence."""

    name = "json"
    leads = ("{", "```json", "```\n{")

    def read_reply(self, text: str) -> list[ToolCall]:
        return _calls_from_value(json_or_none(_strip_fence(text)))


PARSERS: dict[str, type[_Parser]] = {
    cls.name: cls for cls in (HermesParser, DeepSeekV3Parser, Llama3JsonParser, JsonParser)
}


def get_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; ValueError lists the known ones."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(PARSERS)}")
    return PARSERS[name]()


# Which markers in a chat template give away its tool-call format, checked in this order.
TEMPLATE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hermes", ("<tool_call>",)),
    ("deepseek_v3", ("tool▁calls▁begin", "tool▁call▁begin")),
    ("llama3_json", ("<|python_tag|>", '"parameters": dictionary')),
)


def parser_for(chat_template: str | None) -> ToolParser:
    """The parser for the tool-call format ``chat_template`` writes; ``json`` when it shows none."""
    for name, markers in TEMPLATE_MARKERS:
        if chat_template and any(marker in chat_template for marker in markers):
            return get_parser(name)
    return get_parser("json")


@functools.lru_cache(maxsize=32)  # parsed once per template, not on every request
def template_supports_tools(chat_template: str | None) -> bool:
    """True when the Jinja template reads the ``tools`` variable (so it lists the tools itself)."""
    if not chat_template:
        return False
    import jinja2
    from jinja2 import meta

    # transformers' {% generation %} tag is no concern here; drop it so plain Jinja can parse.
    source = re.sub(r"{%-?\s*(?:end)?generation\s*-?%}", "", chat_template)
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(source)
    except jinja2.TemplateError:
        return re.search(r"{[{%][^}]*\btools\b", chat_template) is not None
    return "tools" in meta.find_undeclared_variables(tree)


def calls_from_forced_json(text: str) -> list[ToolCall]:
    """The calls in output made under :func:`forced_call_schema`; [] when it is not whole, valid JSON."""
    return _calls_from_value(json_or_none(_strip_fence(text)))
