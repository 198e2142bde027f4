"""One definition of the ids transformers stops at, shared by the engine, quantize and align."""

from __future__ import annotations

from types import SimpleNamespace

from tandemlm.models.stops import stop_ids


def test_stop_ids_merge_the_generation_config_list_and_the_tokenizer_eos():
    tokenizer = SimpleNamespace(eos_token_id=2)
    assert stop_ids(tokenizer, SimpleNamespace(eos_token_id=[7, 2, "x"])) == {2, 7}  # a chat model's end-of-turn too
    assert stop_ids(tokenizer, SimpleNamespace(eos_token_id=9)) == {2, 9}
    assert stop_ids(tokenizer, None) == {2}
    assert stop_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=None)) == set()
