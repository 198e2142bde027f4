"""Votes → training: the vote panel's "Train DPO on these votes" runs `tandem align dpo` in the background."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tandemlm.deploy.engine import AdapterView
from tandemlm.deploy.load_options import LoadOptions
from tandemlm.deploy.types import SamplingParams
from tandemlm.ui.compare.vote_panel import votes_summary
from tandemlm.ui.engines import EnginePool, EngineSlot
from tandemlm.ui.runs_tab import load_run_policy
from tandemlm.ui.votes.records import Side, append_record, preference_record
from tandemlm.ui.votes.training import dpo_command, start_dpo

TINY = ("--lora", "--lora-layers", "1", "--batch-size", "2", "--max-length", "64", "--threads", "1", "--save-steps", "50",
        "--logging-steps", "1", "--learning-rate", "1e-3", "--lr-scheduler", "constant")
PROMPTS = ["Capital of France?", "Capital of Italy?", "Capital of Spain?"]


def _votes(path: Path) -> Path:
    good = {"Capital of France?": "Paris.", "Capital of Italy?": "Rome.", "Capital of Spain?": "Madrid."}
    for prompt, label in zip(PROMPTS, ("left", "right", "tie"), strict=True):
        answer, wrong = Side("pol", "mock", good[prompt], 7), Side("ref", "mock", "London.", 8)
        left, right = (answer, wrong) if label == "left" else (wrong, answer)
        append_record(path, preference_record([{"role": "user", "content": prompt}], left, right, label, SamplingParams(seed=7)))
    return path


def test_the_panel_names_the_absolute_votes_path_and_counts_only_real_pairs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "none yet" in votes_summary("votes.jsonl") and str(tmp_path / "votes.jsonl") in votes_summary("votes.jsonl")
    _votes(tmp_path / "votes.jsonl")
    line = votes_summary("votes.jsonl")
    assert f"`{tmp_path / 'votes.jsonl'}`: 3 votes, **2 usable DPO pairs**" in line


def test_nothing_to_train_on_is_one_line_before_any_process_starts(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        start_dpo(str(tmp_path / "none.jsonl"), "smollm2", str(tmp_path), 2)
    ties = tmp_path / "ties.jsonl"
    append_record(ties, preference_record([{"role": "user", "content": "hi"}], Side("a", "m", "x"), Side("b", "m", "y"), "tie", SamplingParams()))
    with pytest.raises(ValueError, match="no usable pairs yet"):
        start_dpo(str(ties), "smollm2", str(tmp_path), 2)
    command = dpo_command(ties, "smollm2", tmp_path / "run", 5)
    assert command[-8:] == ["--dataset", str(ties), "--model", "smollm2", "--output-dir", str(tmp_path / "run"), "--max-steps", "5"]


@pytest.mark.slow
def test_train_on_votes_runs_two_dpo_steps_and_the_run_loads_as_the_policy(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    votes = _votes(tmp_path / "votes.jsonl")
    job = start_dpo(str(votes), str(tiny_llama_dir), str(tmp_path / "runs"), 2, TINY)
    seen = []
    deadline = time.monotonic() + 300
    while job.running() and time.monotonic() < deadline:
        seen.append(job.status())
        time.sleep(0.5)
    assert job.succeeded(), job.status()
    assert seen and seen[0].startswith(f"Training `{job.name}`: `") and "/2 (" in seen[0]
    assert job.step() == 2 and job.status().startswith(f"✓ Trained `{job.name}` (2 steps")
    pool = EnginePool(load_options=LoadOptions(dtype="float32"))
    slots = {"policy": EngineSlot("policy", pool, str(tiny_llama_dir)), "reference": EngineSlot("reference", pool, str(tiny_llama_dir))}
    try:
        *_, note = load_run_policy(slots, str(tmp_path / "runs"), job.name)
        assert note.startswith(f"Loaded `{job.name}` as the policy"), note
        assert isinstance(slots["policy"].get(), AdapterView) and slots["policy"].get().base is slots["reference"].get()
    finally:
        pool.close()
