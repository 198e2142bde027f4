"""Data: formats, one-line errors naming file/row/field, vote filtering, generators, verifiers."""

from __future__ import annotations

import json

import pytest

from tandemlm.align.data import DataError, load_dataset, load_rows

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GOOD = [{"role": "assistant", "content": "Paris."}]
BAD = [{"role": "assistant", "content": "Rome."}]

# One row of each TRL dataset type, standard (S_, plain text) and conversational (C_).
S_TEXT = {"text": "The capital of France is Paris."}
C_MESSAGES = {"messages": PROMPT + GOOD}
S_PC = {"prompt": "The capital of France is", "completion": " Paris."}
C_PC = {"prompt": PROMPT, "completion": GOOD}
S_PREF = {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."}
C_PREF = {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}
S_IMPLICIT = {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Rome."}
C_IMPLICIT = {"chosen": PROMPT + GOOD, "rejected": PROMPT + BAD}
S_HH = {  # Anthropic HH-RLHF's own shape: the whole exchange in each answer
    "chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
    "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Rome.",
}
S_UNPAIRED = {"prompt": "The capital of France is", "completion": " Paris.", "label": True}
C_UNPAIRED = {"prompt": PROMPT, "completion": BAD, "label": False}
C_PROMPT = {"prompt": PROMPT, "task": "capital", "answer": "Paris"}


def unpaired(prompt, good, bad):
    """KTO's two rows for one pair, as worked out by hand."""
    return [{"prompt": prompt, "completion": good, "label": True}, {"prompt": prompt, "completion": bad, "label": False}]


# (methods, row as written, rows the method's trainer gets): every type in each form, for every method that takes it.
ACCEPTED = [
    (("sft",), S_TEXT, [S_TEXT]),
    (("sft",), C_MESSAGES, [C_MESSAGES]),
    (("sft",), S_PC, [S_PC]),
    (("sft",), C_PC, [C_PC]),
    (("reward", "dpo"), S_PREF, [S_PREF]),
    (("reward", "dpo"), C_PREF, [C_PREF]),
    (("reward", "dpo"), S_IMPLICIT, [S_PREF]),  # the shared text start is the prompt; its last space stays in the answers
    (("reward", "dpo"), S_HH, [{"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.", "rejected": " Rome."}]),
    (("reward", "dpo"), C_IMPLICIT, [C_PREF]),  # the shared turns are the prompt
    (("kto",), S_UNPAIRED, [S_UNPAIRED]),
    (("kto",), C_UNPAIRED, [C_UNPAIRED]),
    (("kto",), S_PREF, unpaired("The capital of France is", " Paris.", " Rome.")),
    (("kto",), C_PREF, unpaired(PROMPT, GOOD, BAD)),
    (("kto",), S_IMPLICIT, unpaired("The capital of France is", " Paris.", " Rome.")),
    (("kto",), C_IMPLICIT, unpaired(PROMPT, GOOD, BAD)),
    (("grpo", "ppo", "eval"), C_PROMPT, [C_PROMPT]),  # extra columns kept for the verifier
    (("eval",), C_PREF, [C_PREF]),
    (("eval",), C_IMPLICIT, [C_PREF]),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("rows", "method", "message"),
    [
        ([{"prompt": PROMPT, "chosen": GOOD}], "dpo", r"row 1: missing field 'rejected'"),
        ([{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD}, {"prompt": PROMPT, "chosen": GOOD}], "dpo", r"row 2: missing field 'rejected'"),
        ([{"prompt": "What?", "chosen": GOOD, "rejected": BAD}], "reward", r"row 1: field 'chosen' is a conversation but field 'prompt' is plain text; a row's fields must all be"),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], "sft", r"row 1: field 'messages'\[0\]\.role must be one of"),
        ([{"messages": [{"role": "user"}]}], "sft", r"row 1: field 'messages'\[0\]\.content must be a string"),
        ([{"question": "hello"}], "sft", r"row 1: missing field 'messages' \(sft needs messages or text or prompt/completion"),
        # Standard (plain text) and conversational forms: one per file, each in the fields its type takes.
        ([S_PREF, C_PREF], "dpo", r"row 2: field 'prompt' is a conversation, but row 1 holds plain text; every row of a file must take one form"),
        ([C_MESSAGES, {"messages": "hi"}], "sft", r"row 2: field 'messages' is a string, not a conversation \(plain text goes in 'text'\)"),
        ([{"text": PROMPT + GOOD}], "sft", r"row 1: field 'text' is a conversation, not a string \(conversations go in 'messages'\)"),
        ([{"text": 5}], "sft", r"row 1: field 'text' must be text or a list of \{role, content\} messages, got int"),
        ([{**S_PREF, "chosen": "  "}], "dpo", r"row 1: field 'chosen' is empty"),
        ([S_PC, {"prompt": "Q", "completion": GOOD}], "sft", r"row 2: field 'completion' is a conversation but field 'prompt' is plain text"),
        ([{"prompt": "What is the capital of France?"}], "grpo", r"row 1: field 'prompt' is plain text, but the RL methods read only conversations"),
        ([{"prompt": "What is the capital of France?"}], "ppo", r"row 1: field 'prompt' is plain text, but the RL methods read only conversations"),
        ([S_PREF], "eval", r"row 1: field 'prompt' is plain text, but eval reads only conversations"),
        # Implicit prompts: chosen and rejected must start alike and then differ.
        ([S_IMPLICIT, {"chosen": "Paris.", "rejected": "Rome."}], "dpo", r"row 2: no field 'prompt', and fields 'chosen' and 'rejected' share no start"),
        ([{"chosen": PROMPT + GOOD, "rejected": [{"role": "user", "content": "Hi"}, *BAD]}], "reward", r"row 1: no field 'prompt', and fields 'chosen' and 'rejected' share no start"),
        ([{"chosen": "Q? Paris.", "rejected": "Q? Paris. Or Rome."}], "kto", r"row 1: fields 'chosen' and 'rejected' do not differ after their shared start"),
        ([{"chosen": PROMPT + GOOD, "rejected": PROMPT + GOOD}], "dpo", r"row 1: fields 'chosen' and 'rejected' do not differ after their shared start"),
        ([{"chosen": " Paris.", "rejected": " Rome."}], "dpo", r"row 1: fields 'chosen' and 'rejected' share only whitespace"),
        ([{"prompt": PROMPT, "task": "chess", "answer": "e4"}], "grpo", r"row 1: field 'task' is 'chess'; known tasks: arithmetic, capital"),
        ([{"prompt": PROMPT, "completion": GOOD, "label": "yes"}], "kto", r"row 1: field 'label' must be true or false"),
    ],
)
def test_bad_rows_fail_naming_file_row_and_field(tmp_path, rows, method, message):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=rf"data\.jsonl {message}" if message.startswith("row") else message):
        load_rows(path, method)


@pytest.mark.parametrize(
    ("method", "row", "expected"),
    [(method, row, expected) for methods, row, expected in ACCEPTED for method in methods],
    ids=[f"{method}-{'-'.join(row)}-{'text' if isinstance(next(iter(row.values())), str) else 'conversation'}" for methods, row, _ in ACCEPTED for method in methods],
)
def test_every_type_in_both_forms_reaches_the_trainer_as_worked_out_by_hand(tmp_path, method, row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row, row])  # two rows: the one-form check runs across rows
    if method in ("grpo", "ppo", "eval"):  # tandem's own code reads these rows (keep_extra, as ppo and eval load them)
        rows, _, _ = load_rows(path, method, keep_extra=True)
    else:
        rows = load_dataset(path, method).to_list()
    assert rows == expected * 2


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        load_rows(str(empty), "sft")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": PROMPT + GOOD}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl row 2: not valid JSON"):
        load_rows(str(broken), "sft")
    with pytest.raises(DataError, match=r"dataset missing\.jsonl does not exist"):
        load_rows("missing.jsonl", "sft")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_rows(str(tmp_path / "data.csv"), "sft")
    with pytest.raises(DataError, match=r"unknown built-in dataset 'nope'; known: .*prefs_train"):
        load_rows("builtin:nope", "dpo")


def test_ui_votes_tie_and_both_bad_are_skipped(tmp_path):
    votes = [
        {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "label": "left", "model_a": "x"},
        {"prompt": PROMPT, "chosen": None, "rejected": None, "label": "tie"},  # as tandemlm.ui.votes.records writes them
        {"prompt": PROMPT, "chosen": None, "rejected": None, "label": "both_bad"},
        {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "label": "right"},
    ]
    path = write_jsonl(tmp_path / "votes.jsonl", votes)
    for method in ("dpo", "reward"):
        data = load_dataset(path, method)
        assert len(data) == 2 and set(data.column_names) == {"prompt", "chosen", "rejected"}  # vote label dropped
    kto = load_dataset(path, "kto")
    assert kto["label"] == [True, False, True, False]
    only_ties = write_jsonl(tmp_path / "ties.jsonl", votes[1:3])
    with pytest.raises(DataError, match="every row is a tie or both_bad vote"):
        load_rows(only_ties, "dpo")


def test_json_parquet_and_datasets_folder(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": PROMPT, "task": "capital", "answer": "Paris"}] * 3
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("rows.json", "rows.parquet", "saved"):
        data = load_dataset(str(tmp_path / name), "grpo")
        assert len(data) == 3 and {"prompt", "task", "answer"} <= set(data.column_names)  # extras kept for rewards


def test_generator_reproduces_the_shipped_files(tmp_path):
    from tandemlm.align.datagen import country_split, make_builtin_data
    from tandemlm.align.tasks import DATA_DIR

    for path in make_builtin_data(tmp_path):
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), path.name
    train, test = country_split()
    assert not set(train) & set(test)  # held-out prompts ask about unseen countries
    held_out = {json.loads(line)["prompt"][0]["content"] for line in (DATA_DIR / "capitals_test.jsonl").open()}
    assert all(any(c in q for c in test) for q in held_out)


@pytest.mark.parametrize(
    ("task", "response", "answer", "ok"),
    [
        ("capital", "The capital of France is Paris.", "Paris", True),
        ("capital", "paris", "Paris", True),
        ("capital", "It is Paris, or maybe Berlin.", "Paris", False),  # hedging across capitals fails
        ("capital", "Comparison " * 40 + "Paris", "Paris", False),  # rambling past the limit fails
        ("capital", "Kyiv is the capital.", "Kyiv|Kiev", True),
        ("capital", "The capital is Washington, D.C.", "Washington|Washington, D.C.", True),
        ("capital", "The capital of France is Parisian.", "Paris", False),
        ("arithmetic", "12 + 30 = 42", "42", True),
        ("arithmetic", "The answer is 1,024.", "1024", True),
        ("arithmetic", "42 is close but it is 41", "42", False),
        ("arithmetic", "no idea", "42", False),
    ],
)
def test_verifiers(task, response, answer, ok):
    from tandemlm.align.tasks import verify

    assert verify(task, response, answer) is ok


def test_verifier_reward_function_shapes():
    from tandemlm.align.rewards import verifier

    completions = [[{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "Rome."}], "7"]
    assert verifier([], completions, task=["capital", "capital", None], answer=["Paris", "Paris", None]) == [1.0, 0.0, None]


def test_reads_the_votes_the_ui_writes(tmp_path):
    votes = pytest.importorskip("tandemlm.ui.votes.records")
    from tandemlm.deploy.types import SamplingParams

    path = tmp_path / "preferences.jsonl"
    left, right = votes.Side("policy", "transformers", "Paris."), votes.Side("reference", "llama.cpp", "Rome.")
    for label in ("left", "tie", "right", "both_bad"):
        votes.append_record(path, votes.preference_record(PROMPT, left, right, label, SamplingParams()))
    data = load_dataset(str(path), "dpo")
    assert len(data) == 2
    assert [row[0]["content"] for row in data["chosen"]] == ["Paris.", "Rome."]
