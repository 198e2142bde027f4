"""The engine methods that only wrap a Hugging Face tokenizer, shared by the transformers and vLLM backends."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from tandemlm.models.chat_template import Message, render_with_tokenizer, tokenizer_special_tokens, tokenizer_template


class HFTokenizerMethods:
    """Template, tokenizing and vocabulary methods over ``self.tokenizer`` (an HF tokenizer).

    Calls are serialised on ``self._tok_lock``: a fast tokenizer is not safe to use from several
    threads at once, and the server's prepare thread, the UI and scoring may all call in.
    """

    tokenizer: Any
    _tok_lock: threading.Lock
    info: Any

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        with self._tok_lock:
            return render_with_tokenizer(self.tokenizer, self.info.model_id, messages, add_generation_prompt, tools)

    def chat_template_source(self) -> str | None:
        return tokenizer_template(self.tokenizer)

    def special_tokens(self) -> dict[str, str | None]:
        return tokenizer_special_tokens(self.tokenizer)

    def vocabulary_pieces(self) -> Iterator[str | bytes]:
        # Byte-level tokens spell each byte as one character, so their length bounds the text's.
        with self._tok_lock:
            return iter(list(self.tokenizer.get_vocab()))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)
