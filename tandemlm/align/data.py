"""Training data in TRL's conversational formats, loaded and checked before any model loads.

Sources: ``.jsonl``, ``.json`` (a list of rows), ``.parquet``, a folder saved by ``datasets``
(``save_to_disk``), or ``builtin:NAME`` for a file shipped in ``tandemlm/data/``. Formats, one row
per kind (TRL's names):

- ``messages``: ``{"messages": [...]}`` (SFT)
- ``prompt_completion``: ``{"prompt": [...], "completion": [...]}`` (SFT)
- ``preference``: ``{"prompt": [...], "chosen": [...], "rejected": [...]}``, prompt optional (reward, DPO, KTO)
- ``unpaired``: ``{"prompt": [...], "completion": [...], "label": true|false}`` (KTO)
- ``prompt``: ``{"prompt": [...], ...extra columns for reward functions}`` (GRPO)

Every bad input is one line naming the file, row (1-based) and field. Preference rows voted
``tie`` or ``both_bad`` in the UI (``label`` column) carry no preference and are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.errors import decode_utf8
from tandemlm.align.tasks import DATA_DIR

if TYPE_CHECKING:
    from datasets import Dataset

ROLES = ("system", "user", "assistant", "tool")
SKIPPED_VOTES = ("tie", "both_bad")  # UI votes that prefer neither answer
BUILTIN_PREFIX = "builtin:"


class DataError(ValueError):
    """Bad training data; the message is one line naming the file, row and field."""


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    conversations: tuple[str, ...]  # fields that must hold a list of messages
    keep_extra: bool  # extra columns travel with the rows (GRPO reward functions read them)


FORMATS: dict[str, Format] = {
    "messages": Format("messages", ("messages",), ("messages",), False),
    "prompt_completion": Format("prompt_completion", ("prompt", "completion"), ("prompt", "completion"), False),
    "preference": Format("preference", ("chosen", "rejected"), ("prompt", "chosen", "rejected"), False),
    "unpaired": Format("unpaired", ("prompt", "completion", "label"), ("prompt", "completion"), False),
    "prompt": Format("prompt", ("prompt",), ("prompt",), True),
}
# What each method reads, best match first.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "prompt_completion"),
    "reward": ("preference",),
    "dpo": ("preference",),
    "kto": ("unpaired", "preference"),
    "grpo": ("prompt",),
    "ppo": ("prompt",),
    "eval": ("preference", "prompt"),
}


def builtin_datasets() -> list[str]:
    """Names usable as ``builtin:NAME``."""
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def resolve_data_path(ref: str) -> Path:
    """A local path for ``ref`` (``builtin:NAME`` or a path); fails naming what is missing."""
    if not ref:
        raise DataError("no dataset given: pass --dataset FILE (or builtin:NAME)")
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        path = DATA_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(builtin_datasets())}")
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"dataset {ref} does not exist")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a data file or ``datasets`` folder as dicts."""
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".json":
        rows = _read_json(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or a datasets folder")
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(decode_utf8(path.read_bytes(), str(path), DataError).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} row {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(decode_utf8(path.read_bytes(), str(path), DataError))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for number, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: not a folder saved by datasets (save_to_disk)") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (has {', '.join(data)})")
        data = data["train"]
    return data.to_list()


def detect_format(row: dict[str, Any], method: str, source: str) -> Format:
    """The first of ``method``'s formats whose required fields the first row has."""
    names = METHOD_FORMATS.get(method)
    if names is None:
        raise DataError(f"no data formats for method {method!r}; known: {', '.join(METHOD_FORMATS)}")
    for name in names:
        if all(key in row for key in FORMATS[name].required):
            return FORMATS[name]
    wanted = " or ".join("/".join(FORMATS[n].required) for n in names)
    missing = next(key for key in FORMATS[names[0]].required if key not in row)
    raise DataError(f"{source} row 1: missing field {missing!r} ({method} needs {wanted}; row has {', '.join(row) or 'nothing'})")


def check_conversation(value: Any, where: str) -> None:
    """Fails with ``where`` named when ``value`` is not a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        raise DataError(f"{where} is a string, not a conversation (a list of {{role, content}} messages)")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}[{index}] must be an object with role and content")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}[{index}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}[{index}].content must be a string")


def validate_rows(rows: list[dict[str, Any]], fmt: Format, source: str) -> None:
    """Checks every row against ``fmt``; the first bad one raises, naming its row and field."""
    from tandemlm.align.tasks import TASKS

    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        if fmt.name == "preference" and row.get("label") in SKIPPED_VOTES:
            continue  # the UI writes null chosen/rejected for these; they are dropped, not checked
        for key in fmt.required:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
        for key in fmt.conversations:
            if key in row:
                check_conversation(row[key], f"{where}: field {key!r}")
        if fmt.name == "unpaired" and not isinstance(row["label"], bool):
            raise DataError(f"{where}: field 'label' must be true or false, got {row['label']!r}")
        if fmt.name in ("preference",) and "label" in row and not isinstance(row["label"], (str, type(None))):
            raise DataError(f"{where}: field 'label' must be a vote (left, right, tie, both_bad), got {row['label']!r}")
        if "task" in row:
            if row["task"] not in TASKS:
                raise DataError(f"{where}: field 'task' is {row['task']!r}; known tasks: {', '.join(sorted(TASKS))}")
            if not isinstance(row.get("answer"), str):
                raise DataError(f"{where}: field 'answer' must be a string when 'task' is set")


def load_rows(ref: str, method: str, keep_extra: bool = False) -> tuple[list[dict[str, Any]], Format, Path]:
    """Reads and validates ``ref`` for ``method``; returns clean rows, their format and the file.

    Columns a trainer does not read are dropped unless ``keep_extra`` (eval reads e.g. ``kind``).
    """
    path = resolve_data_path(ref)
    source = str(path)
    rows = read_rows(path)
    fmt = detect_format(rows[0], method, source)
    validate_rows(rows, fmt, source)
    if fmt.name == "preference":
        rows = [row for row in rows if row.get("label") not in SKIPPED_VOTES]
        if not rows:
            raise DataError(f"{source}: every row is a tie or both_bad vote; no preferences to learn from")
    if not (fmt.keep_extra or keep_extra):
        keep = set(FORMATS[fmt.name].conversations) | set(FORMATS[fmt.name].required)
        if fmt.name == "preference":
            keep.discard("label")  # a UI vote, not KTO's boolean label
        rows = [{k: v for k, v in row.items() if k in keep} for row in rows]
    return rows, fmt, path


def load_dataset(ref: str, method: str) -> Dataset:
    """``ref`` as a ``datasets.Dataset`` in the shape ``method``'s TRL trainer reads."""
    from datasets import Dataset

    rows, fmt, _ = load_rows(ref, method)
    if method == "kto" and fmt.name == "preference":
        rows = unpair(rows)
    return Dataset.from_list(rows)


def unpair(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs -> KTO's thumbs-up/down rows: each pair gives one desirable and one undesirable."""
    out = []
    for number, row in enumerate(rows, 1):
        if "prompt" not in row:
            raise DataError(f"row {number}: KTO needs an explicit 'prompt' field to split pairs into thumbs-up/down rows")
        prompt = row["prompt"]
        out.append({"prompt": prompt, "completion": row["chosen"], "label": True})
        out.append({"prompt": prompt, "completion": row["rejected"], "label": False})
    return out
