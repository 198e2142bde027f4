"""Stage 2: llama.cpp's quantizer (``llama_model_quantize``) from an f16/bf16/f32 GGUF to one type.

k-quant blocks hold 256 weights, so a tensor whose rows are not a multiple of 256 cannot take a
k-quant type; llama.cpp then quantizes that tensor with a fallback type (q5_0 for q4_K, q5_1 for
q5_K, q8_0 for q6_K, iq4_nl for q2_K/q3_K) and only logs a warning. :func:`find_fallbacks` reads the
result back and names each such tensor and the type it got, so the user is told in one line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.imatrix import QuantizerImatrix
from tandemlm.quantize.quant_types import QuantType
from tandemlm.storage.atomic import atomic_path

K_BLOCK = 256  # weights per k-quant block (ggml's QK_K)
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")  # llama.cpp logs "[  12/ 272] blk.0.attn_q.weight ..."

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Fallback:
    """A tensor that could not take the requested k-quant type and what llama.cpp stored instead."""

    tensor: str
    row_length: int
    stored_as: str  # ggml type name, lower case (q5_0, q8_0, ...)


def quantize_gguf(
    source: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: QuantType,
    nthread: int | None = None,
    progress: ProgressFn | None = None,
    temp_dir: Path | None = None,
    imatrix: QuantizerImatrix | None = None,
    tensor_types: dict[str, str] | None = None,
) -> list[Fallback]:
    """Quantizes ``source`` to ``qtype`` at ``out_path`` (temp file + rename); returns the k-quant fallbacks.

    ``imatrix`` weighs rounding errors by an importance matrix (types that need one are refused
    without it); ``tensor_types`` maps a tensor-name regex to a ggml type name (``q6_K``), llama.cpp's
    per-tensor override, first match wins. The temp file is beside ``out_path``, or named by our PID
    in ``temp_dir`` (same filesystem). ``progress(done, total)`` is called per tensor. Nothing is left
    at ``out_path`` on failure or interruption (Ctrl-C or SIGTERM waits for the C call to return, then cleans up).
    """
    source, out_path = Path(source), Path(out_path)
    if qtype.stage != "quantize":
        raise QuantizeError(f"{qtype.name} is not made by llama.cpp's quantizer (stage {qtype.stage})")
    if qtype.needs_imatrix and imatrix is None:
        raise QuantizeError(needs_imatrix_message(qtype))
    overrides = TensorOverrides(tensor_types or {})
    with atomic_path(out_path, ".partial", temp_dir) as tmp:
        _run_quantizer(source, tmp, qtype, nthread or os.cpu_count() or 1, progress, imatrix, overrides)
        fallbacks = find_fallbacks(tmp, qtype)
    return fallbacks


def find_fallbacks(path: str | os.PathLike[str], qtype: QuantType) -> list[Fallback]:
    """Tensors of a ``qtype`` file whose rows are not multiples of 256 and got a non-k-quant type instead."""
    if not qtype.is_k_quant:
        return []
    found = []
    for tensor in read_gguf_info(path).tensors:
        row = tensor.shape[0] if tensor.shape else 0
        is_matrix = len(tensor.shape) >= 2
        if is_matrix and row % K_BLOCK and tensor.type_name not in FLOAT_TYPES and _block_weights(tensor.type_name) != K_BLOCK:
            found.append(Fallback(tensor.name, row, tensor.type_name.lower()))
    return found


def _block_weights(type_name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]
    except KeyError:
        return 0


def describe_fallbacks(fallbacks: list[Fallback], qtype: QuantType, n_tensors: int | None = None, limit: int = 3) -> str:
    """One line: how many tensors fell back to which types, naming the first few."""
    if not fallbacks:
        return ""
    by_type = Counter(f.stored_as for f in fallbacks)
    kinds = ", ".join(f"{count} as {name}" for name, count in by_type.most_common())
    names = ", ".join(f.tensor for f in fallbacks[:limit]) + (", …" if len(fallbacks) > limit else "")
    of = f" of {n_tensors}" if n_tensors else ""
    return (
        f"{qtype.label}: {len(fallbacks)}{of} tensors have rows not a multiple of {K_BLOCK} and were "
        f"stored with llama.cpp's fallback types ({kinds}): {names}"
    )


# ---------------------------------------------------------------------------------------------
# Running llama_model_quantize


def needs_imatrix_message(qtype: QuantType) -> str:
    """The one line refusing a type that llama.cpp's quantizer cannot make without an importance matrix."""
    return (
        f"type {qtype.name} needs an importance matrix (llama.cpp's quantizer refuses {qtype.label} without one): "
        f"use --imatrix auto or --imatrix FILE"
    )


class TensorOverrides:
    """``llama_model_quantize_params.tt_overrides``: (regex, ggml type) rows, null-terminated."""

    def __init__(self, tensor_types: dict[str, str]) -> None:
        import llama_cpp
        from gguf import GGMLQuantizationType

        known = {t.name.lower(): int(t.value) for t in GGMLQuantizationType}
        self._patterns = [pattern.encode() for pattern in tensor_types]
        self.array = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for row, pattern, type_name in zip(self.array, self._patterns, tensor_types.values(), strict=False):
            if type_name.lower() not in known:
                raise QuantizeError(f"unknown ggml type {type_name!r} for tensors {pattern.decode()}")
            row.pattern = pattern
            row.type = known[type_name.lower()]
        self.empty = not tensor_types  # the last row stays zeroed: llama.cpp stops at a null pattern


def _run_quantizer(
    source: Path, dest: Path, qtype: QuantType, nthread: int, progress: ProgressFn | None,
    imatrix: QuantizerImatrix | None = None, overrides: TensorOverrides | None = None,
) -> None:
    """Calls ``llama_model_quantize`` in a worker thread (so Ctrl-C reaches Python) with our log hook."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = nthread
    if imatrix is not None:
        params.imatrix = ctypes.cast(imatrix.array, type(params.imatrix))
        params.kv_overrides = ctypes.cast(imatrix.metadata(), type(params.kv_overrides))
    if overrides is not None and not overrides.empty:
        params.tt_overrides = ctypes.cast(overrides.array, type(params.tt_overrides))
    log = _QuantizerLog(progress)
    outcome: dict[str, int | BaseException] = {}

    def work() -> None:
        try:
            outcome["rc"] = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = exc

    with log:
        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(timeout=0.2)
        except BaseException:  # Ctrl-C, or SystemExit from a SIGTERM handler
            worker.join()  # the C call cannot be cancelled; let it finish writing before cleaning up
            raise
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if outcome.get("rc", 1) != 0:
        raise _failure(source, dest, log.last_error())


def _failure(source: Path, dest: Path, detail: str) -> Exception:
    if "No space left" in detail or "ENOSPC" in detail:
        return OSError(errno.ENOSPC, f"No space left on device while writing {dest.name}", str(dest))
    return QuantizeError(f"llama.cpp could not quantize {source}: {detail or 'no error message'}")


class _QuantizerLog:
    """Temporarily routes llama.cpp's log through Python: tensor progress, last error, no console spam."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress = progress
        self.errors: list[str] = []
        self._callback = None

    def __enter__(self) -> _QuantizerLog:
        import llama_cpp

        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", "replace").strip()
            if match := _PROGRESS.match(line):
                if self.progress is not None:
                    self.progress(int(match.group(1)), int(match.group(2)))
            elif level == 3 or "failed" in line or "error" in line.lower():  # GGML_LOG_LEVEL_ERROR
                self.errors.append(line)

        self._callback = llama_cpp.llama_log_callback(on_log)  # kept referenced while installed
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *_: object) -> None:
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))  # llama-cpp-python's own

    def last_error(self) -> str:
        return self.errors[-1] if self.errors else ""
