"""Renders a chat template string exactly as transformers does.

HF models use their tokenizer's ``apply_chat_template``; GGUF models carry the same Jinja template
in their metadata. Rendering both with transformers' own renderer (same sandbox, same filters)
is what makes the same messages give the same prompt tokens on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from tandemlm.errors import EngineError

Role = Literal["system", "user", "assistant", "tool"]
Message = dict[str, Any]
"""An OpenAI-style chat message: ``{"role": "user", "content": "..."}``; assistant turns may carry
``tool_calls`` and tool turns ``tool_call_id``."""


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The prompt text ``template`` makes of ``messages`` (and ``tools``, OpenAI function specs, which
    the template sees as its ``tools`` variable); template errors become one-line EngineErrors."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered = render_jinja_template(
            conversations=[list(messages)],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=list(tools) if tools else None,
        )
    except TemplateError as exc:
        raise EngineError(f"chat template rejected the messages: {exc}") from None
    # transformers 5 returns (rendered conversations, generation indices).
    if isinstance(rendered, tuple):
        rendered = rendered[0]
    return rendered if isinstance(rendered, str) else rendered[0]


def tokenizer_template(tokenizer: Any) -> str | None:
    """The Jinja chat template an HF tokenizer carries (None when it has none or several named ones)."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def tokenizer_special_tokens(tokenizer: Any) -> dict[str, str | None]:
    """The texts of an HF tokenizer's BOS, EOS and pad tokens (None where it has none)."""
    return {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")}


def render_with_tokenizer(
    tokenizer: Any,
    model_id: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The prompt an HF tokenizer's own chat template makes of ``messages`` and ``tools``."""
    if not tokenizer.chat_template:
        raise EngineError(f"{model_id} has no chat template (tokenizer_config.json); use generate instead")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, tools=list(tools) if tools else None
    )
