"""Request bodies of Anthropic's Messages API (``POST /v1/messages``), as far as tandemlm serves it.

As strict as :mod:`.schemas`: a field or content block this server does not honour is a 400
naming it, never silently dropped. ``metadata`` and ``cache_control`` are accepted because they
change nothing about the output (a request tag and a prompt-caching hint).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandemlm.deploy.server.schemas import refuse_unknown_types

BLOCK_TYPES = ("text", "tool_use", "tool_result")

# Status codes of this server's errors, as Anthropic names their kinds.
ERROR_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    503: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` (kind from ``status``)."""
    kind = ERROR_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        """The result as one string (its text blocks joined)."""
        return self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class MessageIn(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        return refuse_unknown_types(value, BLOCK_TYPES, "content blocks", f"{', '.join(BLOCK_TYPES)} blocks")

    @model_validator(mode="after")
    def _blocks_fit_role(self) -> MessageIn:
        wrong = "tool_result" if self.role == "assistant" else "tool_use"
        if isinstance(self.content, list) and any(block.type == wrong for block in self.content):
            raise ValueError(f"{wrong} blocks are not allowed in a {self.role} message")
        return self


class ToolIn(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(f"tools of type {kind!r} are not supported: this server runs custom tools only")
        return value


class ToolChoiceIn(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_iff_tool(self) -> ToolChoiceIn:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice.name is required with type 'tool' and only allowed with it")
        return self


class MessagesRequest(Strict):
    """A ``POST /v1/messages`` body; each field maps onto a chat-completions field (see :mod:`.anthropic_api`)."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    # Accepted because it changes nothing about the output: it only tags the request.
    metadata: dict[str, Any] | None = None

    def system_text(self) -> str | None:
        """The system prompt as one string, or None."""
        if isinstance(self.system, list):
            return "".join(block.text for block in self.system)
        return self.system


class CountTokensRequest(MessagesRequest):
    """A ``POST /v1/messages/count_tokens`` body: a Messages request without the generation settings."""

    max_tokens: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_generation_fields(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in ("max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream", "metadata"):
                if name in value:
                    raise ValueError(f"{name} is not part of a count_tokens request (it counts the prompt only)")
        return value
