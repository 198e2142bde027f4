"""A run's metrics.jsonl: one JSON object per log step, appended as training goes.

Read by the plots, the callbacks, the UI's runs tab and the tests; cut back to the resumed
checkpoint's step when a run resumes (the redone steps replace the old lines, never duplicate them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tandemlm.storage.atomic import atomic_write_text


def append_jsonl(path: Any, record: dict[str, Any]) -> None:
    """Appends one JSON line (a kill -9 loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Any, step: int) -> None:
    """Drops lines past ``step`` (a resumed run redoes those steps) and any torn last line."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: Any) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl: [] when it is absent; torn, undecodable or non-object lines skipped.

    The UI reads files a run is still writing, so nothing here may raise on a half-written line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
