"""Votes from the Compare tab as preference records, appended to a JSONL file TRL reads directly.

Each line is one record in TRL's conversational preference format (``prompt`` a list of messages,
``chosen``/``rejected`` one assistant message each), as DPOTrainer and RewardTrainer take it, plus
who answered, the sampling settings and when. In a multi-turn comparison ``prompt`` is the whole
conversation so far as the chosen answer saw it (each side keeps its own earlier replies); a side
whose own conversation differs from ``prompt`` carries it as ``context``. Ties and "both bad" are kept for the record with
``chosen``/``rejected`` set to null; :func:`read_pairs` (and ``tandem align``) skips them.

Appends are atomic across threads and processes: one ``os.write`` of one whole line under an
exclusive ``flock``, so several browser tabs voting at once never tear or lose a record.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tandemlm.deploy.types import SamplingParams
from tandemlm.models.chat_template import Message

Label = Literal["left", "right", "tie", "both_bad"]
LABELS: tuple[str, ...] = ("left", "right", "tie", "both_bad")
SCHEMA = "tandemlm.preference/1"


@dataclass
class Side:
    """One answer of a comparison: who produced it and what it said."""

    model: str
    backend: str
    response: str
    seed: int | None = None  # the sampling seed this side actually used
    context: list[Message] | None = None  # the conversation this side answered (None: the record's prompt)


def preference_record(
    prompt: Sequence[Message],
    left: Side,
    right: Side,
    label: Label,
    params: SamplingParams,
    edited: str | None = None,
) -> dict[str, Any]:
    """Builds one record; ``edited`` (optional) replaces the better answer as ``chosen``.

    ``prompt`` is the conversation of the chosen side when the sides carry their own ``context``
    (so chosen follows the history it was written for), else ``prompt`` as given.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    better = right if label == "right" else left
    shown = [dict(m) for m in (better.context if better.context is not None else prompt)]
    record: dict[str, Any] = {
        "prompt": shown,
        "chosen": None,
        "rejected": None,
        "label": label,
        "chosen_model": None,
        "rejected_model": None,
        "edited": False,
        "left": _side_record(left, shown),
        "right": _side_record(right, shown),
        "sampling": asdict(params),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "schema": SCHEMA,
    }
    if label in ("left", "right"):
        better, worse = (left, right) if label == "left" else (right, left)
        text = edited.strip() if edited and edited.strip() else better.response
        record["chosen"] = [{"role": "assistant", "content": text}]
        record["rejected"] = [{"role": "assistant", "content": worse.response}]
        record["chosen_model"], record["rejected_model"] = better.model, worse.model
        record["edited"] = text != better.response
    return record


def _side_record(side: Side, prompt: list[dict[str, Any]]) -> dict[str, Any]:
    """``side`` as stored: its ``context`` only where it differs from the record's prompt (single-turn: never)."""
    record = asdict(side)
    if record["context"] is None or [dict(m) for m in record["context"]] == prompt:
        del record["context"]
    return record


def append_record(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Appends ``record`` as one JSON line, atomically with respect to other appenders."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: to check the last byte
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if _ends_mid_line(fd):
                # A writer that crashed mid-line (or a hand edit) left no newline; start a fresh line.
                line = b"\n" + line
            written = os.write(fd, line)
            while written < len(line):  # regular files write whole buffers; loop in case one does not
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every parseable record in the file (a damaged line is skipped, not fatal).

    Lines are decoded one by one, so a line cut mid-character (a writer killed mid-write) is
    one damaged line rather than a UnicodeDecodeError for the whole file.
    """
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                yield record


def read_pairs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The chosen/rejected pairs only, as ``{"prompt", "chosen", "rejected"}`` rows for TRL."""
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in read_records(path)
        if r.get("label") in ("left", "right") and r.get("chosen") and r.get("rejected")
    ]
