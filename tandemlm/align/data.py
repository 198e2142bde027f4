"""Training data in TRL's dataset types, standard (plain text) or conversational, loaded and checked before any model loads.

Sources: ``.jsonl``, ``.json`` (a list of rows), ``.parquet``, a folder saved by ``datasets``
(``save_to_disk``), or ``builtin:NAME`` for a file shipped in ``tandemlm/data/``. Types, one row
per kind (TRL's "Dataset formats and types"; our format names first):

- ``messages`` / ``text`` (language modeling): ``{"messages": [...]}`` or ``{"text": "..."}`` (SFT)
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (SFT)
- ``preference``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (reward, DPO, KTO); without
  ``prompt`` it is implicit, the shared start of chosen and rejected, and taken out with TRL's ``extract_prompt``
- ``unpaired``: ``{"prompt": ..., "completion": ..., "label": true|false}`` (KTO)
- ``prompt``: ``{"prompt": [...], ...extra columns for reward functions}`` (the RL methods)

Each ``...`` is plain text (TRL's *standard* form) or a list of ``{role, content}`` messages
(*conversational*); a file keeps one form in every field of every row. Plain text reaches the
trainer as it is, so it never goes through a chat template: TRL's trainers do the same. The RL
methods and eval read conversations only (:data:`CONVERSATIONS_ONLY`).

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


STANDARD, CONVERSATIONAL = "standard", "conversational"  # TRL's names: plain text, or a list of messages
BOTH_FORMS = (STANDARD, CONVERSATIONAL)


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    content: tuple[str, ...]  # fields holding plain text or a conversation, in one form per file
    keep_extra: bool  # extra columns travel with the rows (RL reward functions read them)
    forms: tuple[str, ...] = BOTH_FORMS
    other_form: str = ""  # where a row in the form this format does not take belongs


FORMATS: dict[str, Format] = {
    "messages": Format("messages", ("messages",), ("messages",), False, (CONVERSATIONAL,), "plain text goes in 'text'"),
    "text": Format("text", ("text",), ("text",), False, (STANDARD,), "conversations go in 'messages'"),
    "prompt_completion": Format("prompt_completion", ("prompt", "completion"), ("prompt", "completion"), False),
    "preference": Format("preference", ("chosen", "rejected"), ("prompt", "chosen", "rejected"), False),
    "unpaired": Format("unpaired", ("prompt", "completion", "label"), ("prompt", "completion"), False),
    "prompt": Format("prompt", ("prompt",), ("prompt",), True),
}
# What each method reads, best match first.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "text", "prompt_completion"),
    "reward": ("preference",),
    "dpo": ("preference",),
    "kto": ("unpaired", "preference"),
    "grpo": ("prompt",),
    "ppo": ("prompt",),
    "eval": ("preference", "prompt"),
}
# Readers in tandem's own code (not TRL's), which chat with the model: plain text is refused rather than sent
# through a chat template, which TRL never does to it (its GRPO samples a plain-text prompt as raw text).
# Every RL method (ppo, grpo, dapo, gspo, dcpo) loads its data as "ppo".
CONVERSATIONS_ONLY: dict[str, str] = {"grpo": "the RL methods read", "ppo": "the RL methods read", "eval": "eval reads"}


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


def form_of(value: Any, where: str) -> str:
    """``standard`` for non-blank text, ``conversational`` for a valid conversation; anything else fails naming ``where``."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where} is empty")
        return STANDARD
    if isinstance(value, list):
        check_conversation(value, where)
        return CONVERSATIONAL
    raise DataError(f"{where} must be text or a list of {{role, content}} messages, got {type(value).__name__}")


def _describe(form: str, rows: bool = False) -> str:
    if form == STANDARD:
        return "plain text"
    return "conversations" if rows else "a conversation"


def row_form(row: dict[str, Any], fmt: Format, method: str, where: str) -> str:
    """The one form of ``row``'s content fields, checked against what ``fmt`` and ``method`` take."""
    forms = {key: form_of(row[key], f"{where}: field {key!r}") for key in fmt.content if key in row}
    (first, form), *rest = forms.items()
    for key, other in rest:
        if other != form:
            raise DataError(
                f"{where}: field {key!r} is {_describe(other)} but field {first!r} is {_describe(form)}; "
                "a row's fields must all be plain text or all be conversations"
            )
    if form not in fmt.forms:
        if form == STANDARD:
            raise DataError(f"{where}: field {first!r} is a string, not a conversation ({fmt.other_form})")
        raise DataError(f"{where}: field {first!r} is a conversation, not a string ({fmt.other_form})")
    if form == STANDARD and method in CONVERSATIONS_ONLY:
        raise DataError(
            f"{where}: field {first!r} is plain text, but {CONVERSATIONS_ONLY[method]} only conversations "
            "(a list of {role, content} messages, e.g. [{\"role\": \"user\", \"content\": ...}])"
        )
    return form


def validate_rows(rows: list[dict[str, Any]], fmt: Format, source: str, method: str) -> None:
    """Checks every row against ``fmt`` and ``method`` and all rows share one form; the first bad one raises, naming its row and field."""
    from tandemlm.align.tasks import TASKS

    first: tuple[int, str] | None = None  # (row number, form) of the first checked row
    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        if fmt.name == "preference" and row.get("label") in SKIPPED_VOTES:
            continue  # the UI writes null chosen/rejected for these; they are dropped, not checked
        for key in fmt.required:
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
        form = row_form(row, fmt, method, where)
        if first is None:
            first = (number, form)
        elif form != first[1]:
            key = next(k for k in fmt.content if k in row)
            raise DataError(
                f"{where}: field {key!r} is {_describe(form)}, but row {first[0]} holds {_describe(first[1], rows=True)}; "
                "every row of a file must take one form (plain text or conversations)"
            )
        if fmt.name == "unpaired" and not isinstance(row["label"], bool):
            raise DataError(f"{where}: field 'label' must be true or false, got {row['label']!r}")
        if fmt.name in ("preference",) and "label" in row and not isinstance(row["label"], (str, type(None))):
            raise DataError(f"{where}: field 'label' must be a vote (left, right, tie, both_bad), got {row['label']!r}")
        if "task" in row:
            if row["task"] not in TASKS:
                raise DataError(f"{where}: field 'task' is {row['task']!r}; known tasks: {', '.join(sorted(TASKS))}")
            if not isinstance(row.get("answer"), str):
                raise DataError(f"{where}: field 'answer' must be a string when 'task' is set")


def split_implicit_prompt(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A preference row without ``prompt`` split by TRL's ``extract_prompt``: the shared start of chosen and
    rejected (messages, or text) becomes the prompt. Rows it would split wrongly fail naming ``where``."""
    chosen, rejected = row["chosen"], row["rejected"]
    shortest = min(len(chosen), len(rejected))
    if chosen[:shortest] == rejected[:shortest]:  # extract_prompt would cut inside the shared part
        raise DataError(f"{where}: fields 'chosen' and 'rejected' do not differ after their shared start, so there is no answer to prefer")
    if chosen[0] != rejected[0]:
        raise DataError(
            f"{where}: no field 'prompt', and fields 'chosen' and 'rejected' share no start to take as the "
            "implicit prompt; add a 'prompt' field or put the prompt at the start of both"
        )
    from trl.data_utils import extract_prompt

    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if isinstance(split["prompt"], str) and not split["prompt"].strip():  # only spaces in common
        raise DataError(f"{where}: fields 'chosen' and 'rejected' share only whitespace, no implicit prompt; add a 'prompt' field")
    return {**row, **split}


def load_rows(ref: str, method: str, keep_extra: bool = False) -> tuple[list[dict[str, Any]], Format, Path]:
    """Reads and validates ``ref`` for ``method``; returns clean rows, their format and the file.

    Preference rows come back with an explicit ``prompt`` (see :func:`split_implicit_prompt`). Columns a
    trainer does not read are dropped unless ``keep_extra`` (eval reads e.g. ``kind``).
    """
    path = resolve_data_path(ref)
    source = str(path)
    rows = read_rows(path)
    fmt = detect_format(rows[0], method, source)
    validate_rows(rows, fmt, source, method)
    if fmt.name == "preference":
        rows = [
            row if "prompt" in row else split_implicit_prompt(row, f"{source} row {number}")
            for number, row in enumerate(rows, 1)
            if row.get("label") not in SKIPPED_VOTES
        ]
        if not rows:
            raise DataError(f"{source}: every row is a tie or both_bad vote; no preferences to learn from")
    if not (fmt.keep_extra or keep_extra):
        keep = set(fmt.content) | set(fmt.required)
        if fmt.name == "preference":
            keep.discard("label")  # a UI vote, not KTO's boolean label
        rows = [{k: v for k, v in row.items() if k in keep} for row in rows]
    return rows, fmt, path


def load_dataset(ref: str, method: str) -> Dataset:
    """``ref`` as a ``datasets.Dataset`` in the shape ``method``'s TRL trainer reads.

    KTO gets preference pairs unpaired by TRL's ``unpair_preference_dataset``, one row at a time, so each
    pair's desirable row is followed by its undesirable one.
    """
    from datasets import Dataset

    rows, fmt, _ = load_rows(ref, method)
    data = Dataset.from_list(rows)
    if method == "kto" and fmt.name == "preference":
        from trl.data_utils import unpair_preference_dataset

        data = unpair_preference_dataset(data, batch_size=1)
    return data
