"""torch's refusal of an unsafe pickle checkpoint, as one line naming the file (safetensors is preferred).

transformers, PEFT and our own checkpoints load pickle files (``pytorch_model.bin``, ``*.pt``) with
``torch.load(weights_only=True)``, which refuses a pickle that calls code with a six-line message
inside a long traceback. Every weight load that may meet a pickle runs under :func:`refused_pickle`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tandemlm.errors import EngineError

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl")


def pickle_files(path: str | Path) -> list[Path]:
    """The pickle weight files at ``path``: the file itself, or those directly in a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    return sorted(f for pattern in PICKLE_PATTERNS for f in path.glob(pattern) if f.is_file())


@contextmanager
def refused_pickle(path: str | Path) -> Iterator[None]:
    """Turns torch's ``weights_only`` refusal while loading from ``path`` into one EngineError line naming the file."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as exc:
        files = pickle_files(path)
        where = files[0] if len(files) == 1 else Path(path)
        found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        detail = f": {found[:120]}" if found else ""
        raise EngineError(
            f"{where} is a pickle checkpoint that torch refused to load with weights_only{detail}; "
            "load only safetensors weights (re-save trusted weights with safe_serialization=True)"
        ) from None
