"""The token ids a transformers model stops generating at: one definition for every caller.

transformers stops at the generation config's ``eos_token_id`` (an int or a list: chat models list
their end-of-turn token there) and the tokenizer's EOS; the deploy engine, the quantize verifier and
scorer, and the align samplers all need the same set.
"""

from __future__ import annotations

from typing import Any


def stop_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """EOS ids from ``generation_config.eos_token_id`` (int or list) plus ``tokenizer.eos_token_id``."""
    ids: set[int] = set()
    for value in (getattr(generation_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
