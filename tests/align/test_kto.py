"""KTO (full fine-tune) on the tiny Llama from preference pairs split into thumbs-up/down rows."""

from __future__ import annotations

import pytest
from conftest import changed_tensors, chat_once, metric_values, one_batch, state_dict_of, train_tiny


def test_kto_trains_from_pairs_and_chats(tiny_llama, tmp_path):
    # 2 pairs -> 2 thumbs-up and 2 thumbs-down rows: with batch_size 4 every step sees the same batch.
    data = one_batch("builtin:prefs_train", 2, tmp_path / "data")
    run = train_tiny("kto", tiny_llama, tmp_path / "run", dataset=data, batch_size=4)
    losses = metric_values(run, "loss")
    # Step 1: policy == reference, so every log-ratio is 0 and KTO's loss is 1 - sigmoid(0) = 0.5.
    assert len(losses) == 2 and losses[0] == pytest.approx(0.5, abs=1e-4)
    assert losses[-1] < losses[0] - 0.05, f"loss did not fall on a repeated batch: {losses}"
    assert changed_tensors(state_dict_of(tiny_llama), state_dict_of(run.final))
    chat_once(run.final)
