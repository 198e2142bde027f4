"""Request and response bodies of the OpenAI HTTP API, as far as tandemlm serves it.

Requests are strict: a field this server does not honour is a 400 naming it (pydantic's
``extra="forbid"``), never silently dropped. Fields that change nothing about the output
(``user``, ``metadata``, ``service_tier``...) are accepted as OpenAI's own API accepts them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tandemlm.deploy.types import OutputConstraint


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def refuse_unknown_types(value: Any, known: tuple[str, ...], noun: str, joined: str) -> Any:
    """A ``before`` validator's check of a body's ``content`` list: an item whose ``type`` is not in ``known`` fails
    naming that type (checked before pydantic's union, whose error would list every branch instead)."""
    items = value.get("content") if isinstance(value, dict) else None
    for item in items if isinstance(items, list) else []:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in known:
            raise ValueError(f"{noun} of type {kind!r} are not supported by this server (tandem serve): it reads {joined} only")
    return value


class ContentPart(Strict):
    type: str = "text"
    text: str = ""

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind not in (None, "text"):
            raise ValueError(f"content parts of type {kind!r} are not supported: the served models read text only")
        return value


class FunctionCall(Strict):
    name: str
    arguments: str = "{}"


class ToolCallIn(Strict):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = ""
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None

    def as_message(self) -> dict[str, Any]:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is the newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class StreamOptions(Strict):
    include_usage: bool = False


class FunctionSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolSpec(Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    def constraint(self) -> OutputConstraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputConstraint()
        if self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return OutputConstraint(json_schema=self.json_schema.schema_ or {"type": "object"})


class SamplingFields(Strict):
    """Fields shared by chat and text completions; ``top_k``, ``min_p`` and ``repetition_penalty`` are extensions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Accepted because they change nothing about the output (as in OpenAI's own API).
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None

    @field_validator("store")
    @classmethod
    def _no_storing(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("store=true is not supported: this server keeps no completions")
        return value

    def sampling_kwargs(self) -> dict[str, Any]:
        fields = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "constraint": self.response_format.constraint() if self.response_format else None,
        }
        return {key: value for key, value in fields.items() if value is not None}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        values = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            values["logprobs"] = self.top_logprobs or 0
        return values

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        """``tool_choice`` as OpenAI sends it: a keyword or ``{"type": "function", "function": {"name": ...}}``."""
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as plain OpenAI dicts (what chat templates read), or None."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.tools else None


TokenIds = list[int]


def split_inputs(value: str | list[str] | TokenIds | list[TokenIds], name: str) -> list[str | list[int]]:
    """The separate inputs of a ``prompt`` / ``input`` field: one per string or token-id list."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(item, int) for item in value):
        return [list(value)]  # type: ignore[arg-type]
    if not value:
        raise ValueError(f"{name} must not be empty")
    return list(value)  # type: ignore[arg-type]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of equal to n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only allowed with echo=true (scoring the prompt)")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens=0 cannot be streamed")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one per string or token-id list."""
        return split_inputs(self.prompt, "prompt")

    def sampling_kwargs(self) -> dict[str, Any]:
        values = super().sampling_kwargs()
        if self.max_tokens == 0:
            values["max_tokens"] = 1  # only scored: generation is skipped
        if self.logprobs is not None:
            values["logprobs"] = self.logprobs
        return values


class EmbeddingRequest(Strict):
    """``/v1/embeddings``: the model's own width, mean-pooled and L2-normalised (``dimensions`` is refused)."""

    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported: embeddings come at the model's own width")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The inputs to embed: one per string or token-id list."""
        return split_inputs(self.input, "input")


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[ToolSpec] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
