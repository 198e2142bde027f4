"""SFT on the tiny Llama: loss logged, weights changed, the run folder complete, the result chats."""

from __future__ import annotations

import yaml
from conftest import changed_tensors, chat_once, metric_values, one_batch, state_dict_of, train_tiny


def test_sft_full_finetune_trains_saves_and_chats(tiny_llama, tmp_path):
    data = one_batch("builtin:sft_train", 2, tmp_path / "data")  # batch_size 2: every step trains on this batch
    run = train_tiny("sft", tiny_llama, tmp_path / "run", dataset=data, max_steps=3, save_steps=2)

    losses = metric_values(run, "loss")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, f"loss did not fall on a repeated batch: {losses}"
    assert changed_tensors(state_dict_of(tiny_llama), state_dict_of(run.final))  # full weights moved
    saved = yaml.safe_load((run.dir / "config.yaml").read_text())
    assert saved["method"] == "sft" and saved["lora"] is False and saved["bf16"] is False  # auto resolved for CPU
    info = run.info()
    assert info["status"] == "finished" and info["global_step"] == 3 and info["adapter"] is False
    assert (run.plots / "loss.png").stat().st_size > 1000
    assert [p.name for p in sorted(run.checkpoints.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3"]
    assert not (run.final / "training_args.bin").exists()  # no pickles in the result
    chat_once(run.final)
