"""Every TRL trainer we drive trains on plain-text (TRL's standard form) data, and DPO and the reward model
on implicit-prompt pairs in both forms (issue 24).

Each file holds 2 rows (KTO from pairs: 4) and the batch is that size, so both steps see the same batch and
the loss must fall. Which rows the trainers get is checked by hand in test_data.py; here TRL trains on them.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import metric_values, state_dict_of, train_tiny

PLAIN = [  # the rows of issue 24: plain text with an explicit prompt
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {"prompt": "Capital of Japan?", "chosen": "Tokyo.", "rejected": "Seoul."},
]
IMPLICIT_TEXT = [  # Anthropic HH-RLHF's shape: the whole exchange in each answer, the prompt their shared start
    {"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.", "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Rome."},
    {"chosen": "\n\nHuman: Capital of Japan?\n\nAssistant: Tokyo.", "rejected": "\n\nHuman: Capital of Japan?\n\nAssistant: Seoul."},
]


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


IMPLICIT_CHAT = [  # conversational implicit prompt: the shared user turn is the prompt
    {"chosen": _chat("Capital of France?", "Paris."), "rejected": _chat("Capital of France?", "Rome.")},
    {"chosen": _chat("Capital of Japan?", "Tokyo."), "rejected": _chat("Capital of Japan?", "Seoul.")},
]
UNPAIRED = [
    {"prompt": "Capital of France?", "completion": "Paris.", "label": True},
    {"prompt": "Capital of Japan?", "completion": "Seoul.", "label": False},
]
TEXT = [{"text": "The capital of France is Paris."}, {"text": "The capital of Japan is Tokyo."}]
PROMPT_COMPLETION = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "The capital of Japan is", "completion": " Tokyo."},
]
CASES = {  # id: (method, rows, extra settings)
    "dpo-plain": ("dpo", PLAIN, {}),
    "dpo-implicit-text": ("dpo", IMPLICIT_TEXT, {}),
    "dpo-implicit-chat": ("dpo", IMPLICIT_CHAT, {}),
    "reward-plain": ("reward", PLAIN, {}),
    "reward-implicit-text": ("reward", IMPLICIT_TEXT, {}),
    "reward-implicit-chat": ("reward", IMPLICIT_CHAT, {}),
    "kto-plain-pairs": ("kto", PLAIN, {"batch_size": 4}),  # 2 pairs -> 4 thumbs-up/down rows
    "kto-implicit-text": ("kto", IMPLICIT_TEXT, {"batch_size": 4}),
    "kto-plain-unpaired": ("kto", UNPAIRED, {}),
    "sft-text": ("sft", TEXT, {}),
    "sft-plain-prompt-completion": ("sft", PROMPT_COMPLETION, {}),
}
FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5}  # step 1: LoRA B is zero, policy == reference, every log-ratio 0


@pytest.mark.parametrize(("method", "rows", "extra"), list(CASES.values()), ids=list(CASES))
def test_trains_on_plain_text_and_implicit_prompt_data(tiny_llama, tmp_path, method, rows, extra):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = train_tiny(method, tiny_llama, tmp_path / "run", dataset=str(data), lora=True, lora_layers=1, **extra)
    losses = metric_values(run, "loss")
    assert len(losses) == 2 and losses[-1] < losses[0], f"loss did not fall on a repeated batch: {losses}"
    if method in FIRST_LOSS:
        assert losses[0] == pytest.approx(FIRST_LOSS[method], abs=1e-4)
    adapter = state_dict_of(run.final)
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items())
