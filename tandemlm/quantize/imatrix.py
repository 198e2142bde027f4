"""Importance matrices: computed by llama.cpp's own ``llama-imatrix``, read back, checked against the
model, and handed to llama.cpp's quantizer.

An importance matrix holds, for every weight matrix the model multiplies activations by, the sum of
the squared activations reaching each input column over a calibration text (and how many tokens
were summed, per expert for MoE tensors). The quantizer weighs each weight's rounding error by it.
The file is llama.cpp's GGUF imatrix format (``<tensor>.in_sum2`` and ``<tensor>.counts`` per
tensor, ``imatrix.datasets`` / ``chunk_count`` / ``chunk_size``), so a matrix made by tandem
serves ``llama-quantize`` and one made by llama.cpp serves ``tandem quantize --imatrix FILE``.

Computed matrices are cached by content (the model file's digest, the calibration text's digest,
chunks and chunk size, llama.cpp's version), written under a temp name and renamed when complete.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandemlm.errors import QuantizeError
from tandemlm.llamacpp.programs import llamacpp_binary
from tandemlm.llamacpp.sources import ConversionError, last_error, llama_cpp_version, run_with_status
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.cache import content_key, file_digest
from tandemlm.quantize.texts import Text
from tandemlm.storage.atomic import atomic_path, temp_path_for

SUMS, COUNTS = ".in_sum2", ".counts"
DEFAULT_CHUNKS = 64  # 64 × 512 tokens: llama.cpp's usual calibration size is 100-200 chunks; this is a CPU budget
DEFAULT_CHUNK_SIZE = 512


@dataclass(frozen=True)
class ImatrixEntry:
    """One tensor's data: squared-activation sums (``counts`` rows of ``ne0`` columns) and token counts."""

    sums: np.ndarray  # float32, counts.size * ne0
    counts: np.ndarray  # int64, one per expert (one for a dense tensor)

    @property
    def ne0(self) -> int:
        """Input columns of the weight matrix (its row length)."""
        return self.sums.size // max(self.counts.size, 1)

    def mean_squares(self) -> np.ndarray:
        """What the quantizer takes: sums divided by each expert's count (1.0 for an expert never routed to),
        as llama.cpp's ``llama-quantize`` loads a GGUF matrix."""
        rows = self.sums.reshape(self.counts.size, self.ne0).astype(np.float32)
        safe = np.where(self.counts > 0, self.counts, 1).astype(np.float32)[:, None]
        return np.where(self.counts[:, None] > 0, rows / safe, 1.0).astype(np.float32).ravel()


@dataclass
class Imatrix:
    """A read importance-matrix file."""

    path: Path
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def describe(self) -> str:
        """One phrase for the report: where the matrix came from and how much text it saw."""
        source = ", ".join(self.datasets) or "unnamed text"
        return f"{self.path.name} ({len(self.entries)} tensors, {self.chunk_count} × {self.chunk_size} tokens of {source})"


def read_imatrix(path: str | Path) -> Imatrix:
    """Reads a GGUF importance matrix; a one-line error naming the file if it is not a complete one."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path).expanduser()
    try:
        reader = GGUFReader(path)
    except FileNotFoundError:
        raise QuantizeError(f"--imatrix {path}: no such file") from None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise QuantizeError(f"--imatrix {path}: not a GGUF importance matrix (llama.cpp's imatrix format): {exc}") from None
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tensor in reader.tensors:
        for suffix, table in ((SUMS, sums), (COUNTS, counts)):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != GGMLQuantizationType.F32:
                    raise QuantizeError(f"--imatrix {path}: {tensor.name} is {tensor.tensor_type.name}, not F32")
                table[tensor.name[: -len(suffix)]] = np.asarray(tensor.data, dtype=np.float32).ravel()
    if not sums:
        raise QuantizeError(f"--imatrix {path}: holds no importance data (no *{SUMS} tensors)")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise QuantizeError(f"--imatrix {path}: {unpaired[0]} has {'sums' if unpaired[0] in sums else 'counts'} only")
    entries = {}
    for name, values in sums.items():
        entry = ImatrixEntry(values, np.rint(counts[name]).astype(np.int64))
        if entry.counts.size == 0 or values.size % entry.counts.size:
            raise QuantizeError(f"--imatrix {path}: {name} has {values.size} sums for {entry.counts.size} counts")
        entries[name] = entry
    return Imatrix(path, entries, _strings(reader, "imatrix.datasets"), _int(reader, "imatrix.chunk_count"),
                   _int(reader, "imatrix.chunk_size"))


def _strings(reader: Any, key: str) -> list[str]:
    found = reader.fields.get(key)
    if found is None:
        return []
    return [bytes(found.parts[index]).decode("utf-8", "replace") for index in found.data]


def _int(reader: Any, key: str) -> int:
    found = reader.fields.get(key)
    return int(found.parts[found.data[0]][0]) if found is not None else 0


def check_fits(imatrix: Imatrix, model: str | Path) -> None:
    """Refuses, in one line, a matrix made for another model: a tensor it names that the model lacks, or
    whose row length differs."""
    tensors = {t.name: t for t in read_gguf_info(model).tensors}
    for name, entry in sorted(imatrix.entries.items()):
        tensor = tensors.get(name)
        if tensor is None:
            raise QuantizeError(f"--imatrix {imatrix.path}: was made for another model ({Path(model).name} has no tensor {name})")
        # llama.cpp's quantizer takes rows × matrices values (a 3-D weight, e.g. MLA's attn_k_b, is one
        # matrix per head; an MoE tensor one per expert) and refuses any other count.
        expected = tensor.shape[0] * (tensor.shape[2] if len(tensor.shape) > 2 else 1)
        if entry.sums.size != expected:
            raise QuantizeError(
                f"--imatrix {imatrix.path}: was made for another model ({name} takes {expected} values "
                f"in {Path(model).name}, the matrix has {entry.sums.size})"
            )


class QuantizerImatrix:
    """The matrix as ``llama_model_quantize_params.imatrix`` takes it: a null-terminated array of
    ``llama_model_imatrix_data`` (name, mean squares, size). Keeps the arrays it points into alive."""

    def __init__(self, imatrix: Imatrix) -> None:
        import llama_cpp

        self.source = imatrix
        self._names = [name.encode() for name in imatrix.entries]
        self._values = [entry.mean_squares() for entry in imatrix.entries.values()]
        rows = (llama_cpp.llama_model_imatrix_data * (len(self._names) + 1))()
        for row, name, values in zip(rows, self._names, self._values, strict=False):
            row.name = name
            row.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            row.size = values.size
        self.array = rows  # the last row stays zeroed: the terminator

    def metadata(self) -> Any:
        """``llama_model_quantize_params.kv_overrides``: the ``quantize.imatrix.*`` keys llama-quantize writes
        (file, dataset, entry count, chunk count), null-terminated, so the GGUF says how it was made."""
        import llama_cpp

        imatrix = self.source
        rows: list[tuple[str, int, Any]] = [("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix.path.name)]
        if imatrix.datasets:
            rows.append(("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix.datasets[0]))
        rows.append(("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(imatrix.entries)))
        if imatrix.chunk_count:
            rows.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, imatrix.chunk_count))
        self._metadata = array = (llama_cpp.llama_model_kv_override * (len(rows) + 1))()
        for row, (key, tag, value) in zip(array, rows, strict=False):
            row.key, row.tag = key.encode(), tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                row.value.val_str = value.encode("utf-8")[:127]
            else:
                row.value.val_i64 = value
        return array  # the last row's empty key ends the list


def imatrix_key(model: Path, calibration: Text, chunks: int, chunk_size: int) -> str:
    """Cache key of a computed matrix."""
    return content_key({"imatrix": file_digest(model), "text": calibration.digest, "chunks": chunks,
                        "chunk_size": chunk_size, "llama.cpp": llama_cpp_version()})


def compute_imatrix(
    model: Path, calibration: Text, out: Path, chunks: int = DEFAULT_CHUNKS, chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
) -> Path:
    """Runs ``llama-imatrix`` on ``calibration`` (at most ``chunks`` windows of ``chunk_size`` tokens) and
    writes the matrix to ``out`` (temp name, renamed when llama.cpp finished)."""
    try:
        binary = llamacpp_binary("llama-imatrix")
    except ConversionError as exc:
        raise QuantizeError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    text_file = temp_path_for(out, ".calibration.txt")
    text_file.write_text(calibration.content, encoding="utf-8")
    try:
        with atomic_path(out, ".partial") as tmp:
            # The output name must end in .gguf for llama-imatrix to write the GGUF format.
            staged = tmp.with_name(tmp.name + ".gguf")
            command = [str(binary), "-m", str(model), "-f", str(text_file), "-o", str(staged), "-c", str(chunk_size),
                       "--chunks", str(chunks), "--no-ppl", "-ofreq", str(1 << 30)]
            if threads:
                command += ["-t", str(threads)]
            code, lines = run_with_status(command, None, f"Computing the importance matrix of {model.name}")
            try:
                if code != 0 or not staged.is_file():
                    raise QuantizeError(f"llama-imatrix failed on {model.name} (exit {code}): {last_error(lines)}")
                staged.replace(tmp)
            finally:
                staged.unlink(missing_ok=True)
    finally:
        text_file.unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class ImatrixChoice:
    """What ``--imatrix`` asked for: ``auto`` (compute on ``calibration``), ``none``, or a file."""

    mode: str  # auto | none | file
    file: Path | None = None
    calibration: Text | None = None
    chunks: int = DEFAULT_CHUNKS
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def tag(self) -> str | None:
        """Short key of the matrix the result depends on (None without one): part of cached result names."""
        if self.mode == "none":
            return None
        if self.mode == "file":
            assert self.file is not None
            return content_key({"imatrix_file": file_digest(self.file)})[:12]
        assert self.calibration is not None
        return content_key({"text": self.calibration.digest, "chunks": self.chunks, "chunk_size": self.chunk_size})[:12]


def choose_imatrix(spec: str, calibration: Text | None, chunks: int = DEFAULT_CHUNKS) -> ImatrixChoice:
    """Parses ``--imatrix auto|none|FILE``; a file is read at once so a bad one fails before any work."""
    if chunks < 1:
        raise QuantizeError(f"--calibration-chunks must be at least 1, got {chunks}")
    if spec in ("none", "auto"):
        if spec == "auto" and calibration is None:
            raise QuantizeError("--imatrix auto needs a calibration text (--calibration)")
        return ImatrixChoice(spec, calibration=calibration if spec == "auto" else None, chunks=chunks)
    path = Path(spec).expanduser()
    read_imatrix(path)  # one line naming the file if it is missing, not GGUF or incomplete
    return ImatrixChoice("file", file=path.resolve())


def prepare_imatrix(choice: ImatrixChoice, intermediate: Path, entry: Path, threads: int | None) -> QuantizerImatrix | None:
    """The matrix for quantizing ``intermediate``: read from the file, or computed once into ``entry``
    (the model's cache folder) and reused; checked against the model's tensors."""
    if choice.mode == "none":
        return None
    if choice.mode == "file":
        assert choice.file is not None
        path = choice.file
    else:
        assert choice.calibration is not None
        path = entry / f"imatrix-{choice.tag()}.gguf"
        if not path.is_file():
            compute_imatrix(intermediate, choice.calibration, path, choice.chunks, choice.chunk_size, threads)
    imatrix = read_imatrix(path)
    if choice.calibration is not None:
        imatrix.datasets = [choice.calibration.name]  # llama-imatrix records our temp file's name
    check_fits(imatrix, intermediate)
    return QuantizerImatrix(imatrix)
