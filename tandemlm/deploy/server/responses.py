"""OpenAI response bodies: chat and text completions, whole and streamed, with log-probabilities and tool calls."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.tools import ToolCall, ToolCallDelta
from tandemlm.deploy.types import TokenLogprob, Usage


def new_id(prefix: str, sep: str = "-") -> str:
    """A fresh response id: OpenAI's ``chatcmpl-...``, Anthropic's ``msg_...`` (``sep="_"``)."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def usage_json(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def add_usage(total: Usage, part: Usage | None, count_prompt: bool = True) -> None:
    """Adds ``part`` to ``total`` (choices of one prompt share its prompt tokens: count them once)."""
    if part is None:
        return
    if count_prompt:
        total.prompt_tokens += part.prompt_tokens
    total.completion_tokens += part.completion_tokens


def _token_json(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token_bytes)}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: one entry per token with its top alternatives."""
    content = [_token_json(lp) | {"top_logprobs": [_token_json(alt) for alt in lp.top]} for lp in logprobs]
    return {"content": content, "refusal": None}


def text_logprobs(logprobs: list[TokenLogprob | None], text_start: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a text completion (the legacy shape lm-eval reads).

    ``None`` entries are tokens without a log-probability (the first echoed prompt token).
    ``top_logprobs`` maps token text to log-probability and includes the chosen token, as vLLM does.
    """
    tokens, values, tops, offsets = [], [], [], []
    offset = text_start
    for lp in logprobs:
        if lp is None:
            tokens.append("")
            values.append(None)
            tops.append(None)
            offsets.append(offset)
            continue
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({alt.token: alt.logprob for alt in lp.top} | {lp.token: lp.logprob})
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class ChoiceResult:
    """One finished choice, as gathered from its stream."""

    index: int
    text: str = ""
    reasoning: str = ""
    finish_reason: str = "stop"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    echo_logprobs: list[TokenLogprob | None] = field(default_factory=list)


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return body if index is None else {"index": index, **body}


def tool_delta_json(delta: ToolCallDelta) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": delta.arguments}
    body: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        body["id"] = delta.id
        body["type"] = "function"
    if delta.name is not None:
        function["name"] = delta.name
    body["function"] = function
    return body


class ChatChunks:
    """Builds ``chat.completion`` and ``chat.completion.chunk`` bodies for one response."""

    object_name = "chat.completion"

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.model = model
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def role_chunk(self, index: int) -> dict[str, Any]:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def chunk(
        self,
        index: int,
        content: str = "",
        reasoning: str = "",
        tool_deltas: list[ToolCallDelta] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if content:
            body["content"] = content
        if reasoning:
            # reasoning_content as DeepSeek and vLLM name it; reasoning as newer vLLM and Ollama do.
            body["reasoning_content"] = body["reasoning"] = reasoning
        if tool_deltas:
            body["tool_calls"] = [tool_delta_json(d) for d in tool_deltas]
        choice: dict[str, Any] = {"index": index, "delta": body, "logprobs": None, "finish_reason": finish_reason}
        if logprobs:
            choice["logprobs"] = chat_logprobs(logprobs)
        return {**self._base("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def full(self, choices: list[ChoiceResult], usage: Usage, with_logprobs: bool) -> dict[str, Any]:
        return {**self._base("chat.completion"), "choices": [self._choice(c, with_logprobs) for c in choices], "usage": usage_json(usage)}

    @staticmethod
    def _choice(result: ChoiceResult, with_logprobs: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.reasoning:
            message["reasoning_content"] = message["reasoning"] = result.reasoning
        if result.tool_calls:
            message["tool_calls"] = [tool_call_json(call) for call in result.tool_calls]
            message["content"] = result.text or None
        return {
            "index": result.index,
            "message": message,
            "logprobs": chat_logprobs(result.logprobs) if with_logprobs else None,
            "finish_reason": result.finish_reason,
        }


class TextChunks(ChatChunks):
    """Builds ``text_completion`` bodies (streamed and whole)."""

    object_name = "text_completion"

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = new_id("cmpl")

    def text_chunk(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str | None, text_start: int
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": text_logprobs(list(logprobs), text_start) if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        return {**self._base("text_completion"), "choices": [], "usage": usage_json(usage)}

    def full(self, choices: list[ChoiceResult], usage: Usage, with_logprobs: bool) -> dict[str, Any]:
        out = []
        for result in choices:
            tokens: list[TokenLogprob | None] = [*result.echo_logprobs, *result.logprobs]
            out.append({
                "index": result.index,
                "text": result.text,
                "logprobs": text_logprobs(tokens) if with_logprobs else None,
                "finish_reason": result.finish_reason,
            })
        return {**self._base("text_completion"), "choices": out, "usage": usage_json(usage)}
