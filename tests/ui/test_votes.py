"""Preference records: TRL's conversational format, atomic concurrent appends, the vote handlers."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tandemlm.deploy.types import SamplingParams
from tandemlm.ui.compare.outputs import Comparison
from tandemlm.ui.compare.vote_panel import export_votes, record_vote
from tandemlm.ui.votes.records import Side, append_record, preference_record, read_pairs, read_records

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
LEFT, RIGHT = Side("policy-run", "llama.cpp", "Paris."), Side("smollm2", "llama.cpp", "London.")


def test_left_vote_is_a_trl_conversational_pair_with_provenance():
    record = preference_record(PROMPT, LEFT, RIGHT, "left", SamplingParams(temperature=0.3, seed=7))
    assert record["prompt"] == PROMPT
    assert record["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert record["rejected"] == [{"role": "assistant", "content": "London."}]
    assert (record["chosen_model"], record["rejected_model"]) == ("policy-run", "smollm2")
    assert record["sampling"]["temperature"] == 0.3 and record["sampling"]["seed"] == 7
    assert record["timestamp"].endswith("Z") and record["label"] == "left" and record["edited"] is False


def test_right_vote_with_an_edit_uses_the_edit_as_chosen():
    record = preference_record(PROMPT, LEFT, RIGHT, "right", SamplingParams(), edited="  London, no: Paris.  ")
    assert record["chosen"] == [{"role": "assistant", "content": "London, no: Paris."}]
    assert record["rejected"] == [{"role": "assistant", "content": "Paris."}]
    assert record["chosen_model"] == "smollm2" and record["edited"] is True


@pytest.mark.parametrize("label", ["tie", "both_bad"])
def test_tie_and_both_bad_keep_both_answers_but_make_no_pair(label):
    record = preference_record(PROMPT, LEFT, RIGHT, label, SamplingParams())
    assert record["chosen"] is None and record["rejected"] is None and record["label"] == label
    assert record["left"]["response"] == "Paris." and record["right"]["response"] == "London."


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="label must be one of"):
        preference_record(PROMPT, LEFT, RIGHT, "maybe", SamplingParams())  # type: ignore[arg-type]


def test_concurrent_appends_never_tear_or_lose_records(tmp_path, monkeypatch):
    """The lock is for writes that land in pieces (network file systems may write part of a buffer):
    here every write stores at most half of what it is given, then yields, so without the lock
    another appender's line lands inside this one."""
    import time

    from tandemlm.ui.votes import records

    real_write = os.write

    def partial_write(fd: int, data: bytes) -> int:
        written = real_write(fd, data[: max(1, len(data) // 2)])
        time.sleep(0.0005)  # let another appender run between the pieces
        return written

    monkeypatch.setattr(records.os, "write", partial_write)
    path = tmp_path / "votes.jsonl"
    big = "x" * 2_000

    def vote(thread: int) -> None:
        for i in range(50):
            append_record(path, {"thread": thread, "i": i, "payload": big})

    threads = [threading.Thread(target=vote, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert {(r["thread"], r["i"]) for r in records} == {(t, i) for t in range(8) for i in range(50)}
    assert all(r["payload"] == big for r in records)


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text('{"label": "left", "prompt": [{"role": "us')  # a writer died mid-line
    append_record(path, preference_record(PROMPT, LEFT, RIGHT, "left", SamplingParams()))
    records = list(read_records(path))
    assert len(records) == 1 and records[0]["chosen"][0]["content"] == "Paris."


def test_a_line_cut_mid_character_is_skipped_and_the_lines_around_it_are_read(tmp_path):
    path = tmp_path / "votes.jsonl"
    append_record(path, preference_record(PROMPT, LEFT, RIGHT, "left", SamplingParams()))
    with path.open("ab") as handle:
        handle.write(b'{"prompt": "caf\xc3')  # a writer killed inside the two bytes of "é"
    append_record(path, preference_record(PROMPT, LEFT, RIGHT, "right", SamplingParams()))
    assert [r["label"] for r in read_records(path)] == ["left", "right"]
    assert len(read_pairs(path)) == 2


def test_read_pairs_skips_ties_and_loads_as_a_dataset(tmp_path):
    path = tmp_path / "votes.jsonl"
    for label in ("left", "tie", "right", "both_bad"):
        append_record(path, preference_record(PROMPT, LEFT, RIGHT, label, SamplingParams()))
    pairs = read_pairs(path)
    assert [p["chosen"][0]["content"] for p in pairs] == ["Paris.", "London."]
    assert set(pairs[0]) == {"prompt", "chosen", "rejected"}

    from datasets import load_dataset  # the file as a whole, ties included, is one table

    table = load_dataset("json", data_files=str(path), split="train")
    assert table.num_rows == 4 and table["label"] == ["left", "tie", "right", "both_bad"]
    assert table["chosen"][1] is None and table["prompt"][0] == PROMPT


def _comparison() -> Comparison:
    return Comparison(prompt=PROMPT, left=LEFT, right=RIGHT, params=SamplingParams())


def test_vote_handler_records_once_and_explains_otherwise(tmp_path):
    path = str(tmp_path / "sub" / "votes.jsonl")
    status, state = record_vote(path, None, "left")
    assert "run a comparison first" in status and not (tmp_path / "sub").exists()
    status, state = record_vote(path, _comparison(), "right", "Paris, edited.")
    assert "Recorded **right** (edited answer as chosen)" in status and state.voted == "right"
    status, _ = record_vote(path, state, "left")
    assert "Already recorded" in status
    assert [r["chosen"][0]["content"] for r in read_records(path)] == ["Paris, edited."]


def test_vote_on_an_empty_answer_asks_for_an_edit(tmp_path):
    comparison = Comparison(PROMPT, Side("a", "mock", ""), RIGHT, SamplingParams())
    status, state = record_vote(str(tmp_path / "v.jsonl"), comparison, "left")
    assert "empty" in status and state.voted is None


def test_unwritable_votes_file_is_a_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, state = record_vote(str(blocker / "votes.jsonl"), _comparison(), "left")
    assert status.startswith("⚠ could not write") and state.voted is None


def test_export_copies_a_snapshot(tmp_path):
    path = tmp_path / "votes.jsonl"
    assert export_votes(str(path)) == (None, f"No votes yet (`{path}` does not exist).")
    record_vote(str(path), _comparison(), "tie")
    copy, status = export_votes(str(path))
    assert copy != str(path) and open(copy).read() == path.read_text() and status == "1 records exported."


def _multi_turn_votes(path) -> tuple[list[dict], list[dict]]:
    """Turn 2 of a comparison: each side saw its own first reply; the right one wins."""
    head = [{"role": "user", "content": "Capital of France?"}]
    left_history = [*head, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    right_history = [*head, {"role": "assistant", "content": "London."}, {"role": "user", "content": "And Italy?"}]
    left = Side("policy-run", "mock", "Rome.", 1, context=left_history)
    right = Side("smollm2", "mock", "Milan.", 2, context=right_history)
    comparison = Comparison(prompt=left_history, left=left, right=right, params=SamplingParams())
    record_vote(str(path), comparison, "right")
    return left_history, right_history


def test_a_later_turn_stores_the_conversation_so_far_as_the_prompt_and_trains_as_dpo_data(tmp_path):
    from tandemlm.align.data import load_dataset as load_training_data

    path = tmp_path / "votes.jsonl"
    left_history, right_history = _multi_turn_votes(path)
    [record] = read_records(path)
    # The prompt is the conversation the chosen answer followed; the other side's own one is kept beside it.
    assert record["prompt"] == right_history and record["chosen"] == [{"role": "assistant", "content": "Milan."}]
    assert record["left"]["context"] == left_history and "context" not in record["right"]
    append_record(path, preference_record(PROMPT, LEFT, RIGHT, "left", SamplingParams()))  # a single-turn vote too
    rows = load_training_data(str(path), "dpo")  # what `tandem align dpo --dataset votes.jsonl` trains on
    assert rows.num_rows == 2 and rows[0]["prompt"] == right_history and set(rows.column_names) == {"prompt", "chosen", "rejected"}
    assert [p["prompt"] for p in read_pairs(path)] == [right_history, PROMPT]


def test_single_turn_records_carry_no_context():
    left, right = Side("a", "m", "x", context=list(PROMPT)), Side("b", "m", "y", context=list(PROMPT))
    record = preference_record(PROMPT, left, right, "left", SamplingParams())
    assert record["prompt"] == PROMPT and "context" not in record["left"] and "context" not in record["right"]
