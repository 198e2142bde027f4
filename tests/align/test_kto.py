"""KTO (full fine-tune) on the tiny Llama from preference pairs split into thumbs-up/down rows."""

from __future__ import annotations

from conftest import changed_tensors, chat_once, metric_values, state_dict_of, train_tiny


def test_kto_trains_from_pairs_and_chats(tiny_llama, tmp_path):
    run = train_tiny("kto", tiny_llama, tmp_path / "run", dataset="builtin:prefs_train", batch_size=4)
    assert len(metric_values(run, "loss")) == 2
    assert changed_tensors(state_dict_of(tiny_llama), state_dict_of(run.final))
    chat_once(run.final)
