"""The original model's logits, kept on disk while the quantized model is scored against them.

8,192 scored positions × a 49k-152k vocabulary is 1.6-5 GB of float32: too much to hold in RAM
next to a second model. :class:`LogitStore` writes each window's rows, as the scorer returned them
(float32, bit for bit: the KL divergence computed from them is exactly the in-RAM one), into a
numpy memmap in the quantize temp folder, and removes the file when closed. The file is named
``<pid>-reference.…`` so ``cache.sweep_stale_temps`` removes it after a run killed with SIGKILL (the next
store sweeps its folder before writing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

from tandemlm.quantize.cache import sweep_stale_temps, temp_folder
from tandemlm.quantize.space import require_free_space


class LogitStore:
    """Rows of float32 logits, window after window, in a temp-file memmap of ``rows × vocab``."""

    def __init__(self, rows: int, folder: Path | None = None) -> None:
        self.rows = rows
        self.folder = folder or temp_folder()
        self.path: Path | None = None
        self._data: np.memmap | None = None
        self._spans: list[tuple[int, int]] = []  # (first row, row count) per window
        self._next = 0

    def append(self, logits: np.ndarray) -> None:
        """Stores one window's rows (the file is made on the first call, when the vocabulary is known)."""
        if self._data is None:
            self._data = self._open(logits.shape[1])
        if logits.shape[1] != self._data.shape[1] or self._next + len(logits) > self.rows:
            raise ValueError(f"logits of shape {logits.shape} do not fit the store ({self.rows} × {self._data.shape[1]})")
        self._data[self._next : self._next + len(logits)] = logits
        self._spans.append((self._next, len(logits)))
        self._next += len(logits)

    def window(self, index: int) -> np.ndarray:
        """The rows stored by the ``index``-th :meth:`append` (a view onto the file)."""
        assert self._data is not None
        start, count = self._spans[index]
        return self._data[start : start + count]

    def __len__(self) -> int:
        return len(self._spans)

    def close(self) -> None:
        """Removes the file (its pages are freed once the last view onto it is gone)."""
        self._data = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def _open(self, vocab: int) -> np.memmap:
        sweep_stale_temps(self.folder)  # what a report killed with SIGKILL left: gigabytes each
        needed = self.rows * vocab * np.dtype(np.float32).itemsize
        require_free_space(self.folder, needed, f"the original model's logits ({self.rows} positions × {vocab} tokens)")
        handle, name = tempfile.mkstemp(prefix=f"{os.getpid()}-reference.", suffix=".f32", dir=self.folder)
        os.close(handle)
        self.path = Path(name)
        return np.memmap(self.path, dtype=np.float32, mode="w+", shape=(self.rows, vocab))
