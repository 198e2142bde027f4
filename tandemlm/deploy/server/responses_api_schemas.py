"""Request bodies of OpenAI's Responses API (``POST /v1/responses``), as far as tandemlm serves it.

As strict as :mod:`.schemas`: a field, input item, content part or tool this server does not honour
is a 400 naming it, never silently dropped. This server keeps no responses, so ``store: true`` and
``previous_response_id`` are refused: the whole conversation comes in ``input`` each time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from tandemlm.deploy.server.schemas import refuse_unknown_types

PART_TYPES = ("input_text", "output_text")
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
NO_STORE = "this server keeps no responses (send the whole conversation in input)"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    # Sent back with an earlier answer's output_text; they change nothing about the prompt.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None
    parsed: Any = None  # the SDK's parse()/stream() helpers add it to the items they hand back


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    parsed_arguments: Any = None  # added by the SDK's parse()/stream() helpers; the arguments say it all


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    # An earlier answer's message item, sent back as it came, carries these.
    id: str | None = None
    status: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_parts(cls, value: Any) -> Any:
        return refuse_unknown_types(value, PART_TYPES, "content parts", f"{' and '.join(PART_TYPES)} parts")

    def text(self) -> str:
        """The message's text (its parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class ReasoningItem(Strict):
    """An earlier answer's reasoning, sent back with it: accepted and left out of the prompt, as
    the chat route does with an assistant turn's ``reasoning_content`` (templates drop past thinking)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: str | None = None


def _item_type(value: Any) -> str:
    # An item without a type is a message (OpenAI's "easy input message").
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind != "function":
            raise ValueError(f"tools of type {kind!r} are not supported: this server runs function tools only")
        return value


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("text.format of type json_schema needs name and schema")
        return self


class TextConfig(Strict):
    format: TextFormat | None = None


class ResponsesRequest(Strict):
    """A ``POST /v1/responses`` body; each field maps onto a chat-completions field (see :mod:`.responses_api`)."""

    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    # Accepted because they change nothing about the output (request tags), as the chat route does.
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value: Any) -> Any:
        # Checked before the union so the error names the item type instead of pydantic's tag list.
        for item in value if isinstance(value, list) else []:
            kind = _item_type(item)
            if kind not in ITEM_TYPES:
                raise ValueError(
                    f"input items of type {kind!r} are not supported by this server (tandem serve): "
                    f"it reads {', '.join(ITEM_TYPES)} items only"
                )
        return value

    @field_validator("store")
    @classmethod
    def _no_storing(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(f"store=true is not supported: {NO_STORE}")
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(f"previous_response_id is not supported: {NO_STORE}")
        return value

    @model_validator(mode="after")
    def _input_not_empty(self) -> ResponsesRequest:
        if not self.input:
            raise ValueError("input must not be empty")
        return self
