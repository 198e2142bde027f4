"""MODEL → GGUF of one quant type, as three explicit stages: convert, quantize, verify.

1. **convert**: llama.cpp's ``convert_hf_to_gguf.py`` writes an f16 GGUF (bf16 when the checkpoint
   is bf16, whose range f16 cannot hold), or the requested type directly for f32/f16/bf16.
2. **quantize**: ``llama_model_quantize`` makes the requested type from that GGUF.
3. **verify**: the result is read back, run and compared with the HF tokenizer (:mod:`.verify`).

MODEL is an HF folder, a hub id, a built-in name (its HF copy is materialised from the packaged
GGUF) or an f32/f16/bf16 GGUF; ``adapter`` merges a LoRA first. Every file is written under a
temp name and renamed only when its stage succeeded; the result reaches ``out`` only after
verification, so an interrupted or failed run leaves nothing under the final name. Temp files live
in the cache's temp folder named by our PID: removed on every exit Python sees, and swept by the
next run when a killed run left them. Results are cached by content (:mod:`.cache`): the same input
and type twice reuses the verified file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandemlm.errors import QuantizeError
from tandemlm.models.gguf_info import read_gguf_info
from tandemlm.quantize.adapter_merge import checked_adapter, merge_adapter
from tandemlm.quantize.cache import (
    content_key,
    file_digest,
    folder_digest,
    publish_copy,
    quantize_cache_root,
    sweep_stale_temps,
    temp_folder,
)
from tandemlm.quantize.imatrix import (
    DEFAULT_CHUNKS,
    ImatrixChoice,
    QuantizerImatrix,
    choose_imatrix,
    prepare_imatrix,
)
from tandemlm.quantize.llamacpp_tools import ConversionError, convert_hf_to_gguf, llama_cpp_version
from tandemlm.quantize.quant_types import QuantType, ftype_name, get_quant_type, quant_type_for_ftype
from tandemlm.quantize.quantizer import Fallback, describe_fallbacks, needs_imatrix_message, quantize_gguf
from tandemlm.quantize.report import QualityReport, ReportSettings, compare_models
from tandemlm.quantize.space import count_params, disk_full_error, is_disk_full, planned_bytes, require_free_space
from tandemlm.quantize.texts import Text, builtin_calibration, text_file
from tandemlm.quantize.verify import Verification, verify_gguf
from tandemlm.storage.atomic import atomic_path, atomic_write_text

FLOAT_FTYPES = {"f32", "f16", "bf16"}


@dataclass
class QuantizeConfig:
    """One ``tandem quantize`` run."""

    model: str = field(metadata={"help": "HF folder, hub id, built-in name, or an f32/f16/bf16 .gguf file."})
    qtype: str = field(default="q4_k_m", metadata={"help": "Quant type (tandem quantize --list)."})
    out: Path | None = field(default=None, metadata={"help": "Output .gguf (default ./<model>-<TYPE>.gguf)."})
    adapter: Path | None = field(default=None, metadata={"help": "LoRA adapter folder merged into MODEL first."})
    threads: int | None = field(default=None, metadata={"help": "Quantizer and verifier CPU threads (default: all)."})
    strict: bool = field(default=False, metadata={"help": "Fail instead of warn when tensors fall back from a k-quant."})
    use_cache: bool = field(default=True, metadata={"help": "Reuse and keep verified results and f16 intermediates."})
    report: ReportSettings | None = field(default=None, metadata={"help": "Also measure quality (None: skip)."})
    report_against: str = field(default="gguf", metadata={"help": "Report's original: gguf (the f16 intermediate) or hf."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the checkpoint."})
    publish: bool = field(default=True, metadata={"help": "Copy the result to out; False leaves it in the cache only."})
    cache_root: Path | None = field(default=None, metadata={"help": "Cache folder (default cache_dir()/quantize)."})
    imatrix: str = field(default="auto", metadata={"help": "Importance matrix: auto (computed on --calibration), none, or a GGUF imatrix FILE."})
    calibration: str = field(default="builtin", metadata={"help": "Text the matrix is computed on: builtin, or a .txt/.jsonl FILE."})
    calibration_chunks: int = field(default=DEFAULT_CHUNKS, metadata={"help": "At most this many 512-token windows of it."})
    calibration_text: Text | None = field(default=None, metadata={"help": "A calibration text given in code (an alignment run's data)."})

    def __post_init__(self) -> None:
        row = self.quant_type  # unknown types list the known ones
        if row.stage == "bitsandbytes":
            raise QuantizeError(
                f"type {row.name} is a load-time bitsandbytes quantization for the transformers backend, "
                f"not a file: use --serve, or tandem serve MODEL --quantize {row.name}"
            )
        if self.out is not None:
            self.out = Path(self.out).expanduser()
            if self.out.suffix != ".gguf" or self.out.is_dir():
                raise QuantizeError(f"--out {self.out} must be a file name ending in .gguf")
        if self.adapter is not None:
            self.adapter = Path(self.adapter).expanduser()
            if not self.adapter.is_dir():
                raise QuantizeError(f"--adapter {self.adapter} is not a folder")
        if self.threads is not None and self.threads < 1:
            raise QuantizeError(f"--threads must be at least 1, got {self.threads}")
        if not self.publish and not self.use_cache:
            raise QuantizeError("publish=False keeps the result only in the cache, so it needs use_cache=True")
        if self.report_against not in ("gguf", "hf"):
            raise QuantizeError(f"--report-against must be gguf or hf, got {self.report_against!r}")
        if row.needs_imatrix and self.imatrix == "none":
            raise QuantizeError(needs_imatrix_message(row))

    def imatrix_choice(self) -> ImatrixChoice:
        """What ``--imatrix`` asks for this type (``none`` for types the quantizer makes without one)."""
        if not self.quant_type.uses_imatrix:
            return ImatrixChoice("none")
        calibration = self.calibration_source() if self.imatrix == "auto" else None  # only auto computes one
        return choose_imatrix(self.imatrix, calibration, self.calibration_chunks)

    def calibration_source(self) -> Text:
        """The calibration text: given in code, else ``--calibration`` (builtin, or a .txt/.jsonl file)."""
        if self.calibration_text is not None:
            return self.calibration_text
        return builtin_calibration() if self.calibration == "builtin" else text_file(self.calibration, "--calibration")

    @property
    def quant_type(self) -> QuantType:
        """The row of :data:`~tandemlm.quantize.quant_types.QUANT_TYPES` that ``qtype`` names."""
        return get_quant_type(self.qtype)


@dataclass
class QuantizeResult:
    """A verified GGUF and what the run found."""

    path: Path
    qtype: QuantType
    cached: bool
    fallbacks: list[Fallback]
    verification: Verification
    key: str
    hf_folder: Path | None
    intermediate: Path | None
    seconds: dict[str, float] = field(default_factory=dict)
    report: QualityReport | None = None
    imatrix: str | None = None  # what the importance matrix was made from, or None without one

    def fallback_line(self) -> str:
        """One line naming the tensors that fell back from the k-quant type, or ''."""
        return describe_fallbacks(self.fallbacks, self.qtype, self.verification.tensors)


@dataclass
class _Source:
    """What stage 1 reads: an HF folder, or a float GGUF that skips conversion."""

    model_id: str
    hf_folder: Path | None
    gguf: Path | None
    digest: dict[str, Any]
    bf16: bool = False

    @property
    def intermediate_type(self) -> str:
        # bf16 checkpoints can hold values past f16's 65504; f16 would turn them into inf.
        return "bf16" if self.bf16 else "f16"


def quantize_model(config: QuantizeConfig, console: Any = None) -> QuantizeResult:
    """Runs convert → quantize → verify for ``config`` and publishes the result at its ``out`` path."""
    from rich.console import Console

    console = console or Console(stderr=True)
    sweep_stale_temps(temp_folder(_cache_root(config)))  # what runs killed with SIGKILL left behind
    qtype = config.quant_type
    choice = config.imatrix_choice()  # a bad --imatrix or --calibration fails before any work
    source = _prepare_source(config, console)
    key = content_key({**source.digest, "llama.cpp": llama_cpp_version()})
    out = config.out or Path.cwd() / f"{source.model_id}-{qtype.label}.gguf"
    with _entry_dir(_cache_root(config), key, config.use_cache) as entry:
        name = qtype.label if choice.tag() is None else f"{qtype.label}-imatrix-{choice.tag()}"
        result_path = entry / f"{name}.gguf"
        record_path = entry / f"{name}.json"
        if config.use_cache and result_path.is_file() and record_path.is_file():
            result = _from_cache(result_path, record_path, qtype, key, source, entry)
            console.print(f"[green]✓[/green] reusing verified {qtype.label} from the cache ({result_path})")
            if result.fallbacks:
                console.print(f"[yellow]warning:[/yellow] {result.fallback_line()}")
        else:
            _check_space(source, qtype, entry)
            result = _run_stages(config, source, choice, key, entry, result_path, record_path, console)
        if config.report is not None:
            result.report = _run_report(config, result, console)
            result.report.imatrix = result.imatrix  # the card says what the matrix was made from
        if config.publish:  # a hard link where it can (the cache or temp folder is usually on out's disk)
            result.path = publish_copy(result_path, out)
    return result


# ---------------------------------------------------------------------------------------------
# Source


def _prepare_source(config: QuantizeConfig, console: Any) -> _Source:
    """Resolves MODEL to an HF folder or float GGUF; merges the adapter; computes the content digest."""
    from tandemlm.models.resolve import resolve_model

    path = Path(config.model).expanduser()
    if path.is_file():  # read_gguf_info checks the header as resolve_model would, without GGUFReader's slow parse
        if config.adapter is not None:
            raise QuantizeError(f"--adapter needs an HF model folder; {path} is a file")
        return _gguf_source(path.resolve())
    resolved = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    if resolved.builtin:
        with console.status(f"materialising the HF copy of built-in {resolved.builtin} (once)"):
            folder = resolved.hf_folder()
    else:
        folder = resolved.path
    digest: dict[str, Any] = {"model": folder_digest(folder)}
    model_id = resolved.model_id.rsplit("/", 1)[-1]  # a hub id's org/ would become a folder in the default out name
    if config.adapter is not None:
        checked_adapter(config.adapter)  # fails in one line before anything is loaded
        digest["adapter"] = folder_digest(config.adapter)
        target = _cache_root(config) / content_key(digest) / "merged"
        with console.status(f"merging LoRA adapter {config.adapter.name} into {model_id}"):
            folder = merge_adapter(folder, config.adapter, target)
        model_id = f"{model_id}-{config.adapter.name}"
    return _Source(model_id, folder, None, digest, bf16=_is_bf16(folder))


def _gguf_source(path: Path) -> _Source:
    info = read_gguf_info(path)
    row = quant_type_for_ftype(info.file_type) if info.file_type is not None else None
    if row is None or row.name not in FLOAT_FTYPES:
        kind = ftype_name(info.file_type) if info.file_type is not None else "no general.file_type"
        raise QuantizeError(
            f"{path} is already quantized ({kind}); quantize from its HF checkpoint or an f32/f16/bf16 GGUF"
        )
    return _Source(path.stem, None, path, {"gguf": file_digest(path)}, bf16=row.name == "bf16")


def _is_bf16(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "") == "bfloat16"


# ---------------------------------------------------------------------------------------------
# Stages


def _run_stages(
    config: QuantizeConfig, source: _Source, choice: ImatrixChoice, key: str, entry: Path,
    result_path: Path, record_path: Path, console: Any,
) -> QuantizeResult:
    qtype = config.quant_type
    seconds: dict[str, float] = {}
    stage = "convert"
    temp_dir = temp_folder(_cache_root(config))
    try:
        # Renamed to the result's name only when the block ends: after the verify stage and its record.
        with atomic_path(result_path, ".unverified", temp_dir) as unverified:
            with _timed(seconds, "convert", console, f"[1/3] convert {source.model_id} → {_stage1_type(source, qtype)} GGUF"):
                intermediate = _convert(source, qtype, entry, temp_dir)
            stage = "quantize"
            imatrix = None
            if choice.mode != "none":
                with _timed(seconds, "imatrix", console, "[2/3] quantize: importance matrix (llama-imatrix, cached)"):
                    imatrix = prepare_imatrix(choice, intermediate, entry, config.threads)
                console.print(f"    [dim]{imatrix.source.describe()}[/dim]")
            with _timed(seconds, "quantize", console, f"[2/3] quantize → {qtype.label}"):
                fallbacks = _quantize(intermediate, unverified, qtype, config.threads, console, temp_dir, imatrix)
            if fallbacks:
                line = describe_fallbacks(fallbacks, qtype, len(read_gguf_info(unverified).tensors))
                if config.strict:
                    raise QuantizeError(f"{line} (--strict)")
                console.print(f"[yellow]warning:[/yellow] {line}")
            stage = "verify"
            reference = intermediate if qtype.stage == "quantize" else None
            with _timed(seconds, "verify", console, "[3/3] verify: read back, run, compare"), console.status("verifying"):
                verification = verify_gguf(unverified, qtype, source.hf_folder, reference, config.threads, config.trust_remote_code)
            console.print(f"[green]✓[/green] verified: {verification.summary()}")
            used = imatrix.source.describe() if imatrix is not None else None
            record = {"key": key, "type": qtype.name, "fallbacks": [vars(f) for f in fallbacks],
                      "verification": verification.to_dict(), "imatrix": used}
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(entry, stage) from None
        raise
    except ConversionError as exc:
        if is_disk_full(exc):
            raise disk_full_error(entry, stage) from None
        raise
    return QuantizeResult(result_path, qtype, False, fallbacks, verification, key, source.hf_folder, intermediate, seconds, imatrix=used)


def _stage1_type(source: _Source, qtype: QuantType) -> str:
    return qtype.name if qtype.stage == "convert" else source.intermediate_type


def _convert(source: _Source, qtype: QuantType, entry: Path, temp_dir: Path) -> Path:
    """Stage 1: the converter's GGUF (cached in the entry folder); a float GGUF source is used as is."""
    if source.gguf is not None:
        return source.gguf
    outtype = _stage1_type(source, qtype)
    path = entry / f"intermediate-{outtype}.gguf"
    if not path.is_file():
        assert source.hf_folder is not None
        convert_hf_to_gguf(source.hf_folder, path, outtype=outtype, temp_dir=temp_dir)
    return path


def _quantize(
    intermediate: Path, dest: Path, qtype: QuantType, threads: int | None, console: Any, temp_dir: Path,
    imatrix: QuantizerImatrix | None = None,
) -> list[Fallback]:
    """Stage 2: llama.cpp's quantizer with a per-tensor progress bar; convert-stage types are linked as is."""
    if qtype.stage == "convert":
        dest.unlink(missing_ok=True)
        try:
            os.link(intermediate, dest)
        except OSError:
            shutil.copyfile(intermediate, dest)
        return []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("    tensors"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("quantize", total=None)
        return quantize_gguf(
            intermediate, dest, qtype, nthread=threads, temp_dir=temp_dir, imatrix=imatrix,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )


def _run_report(config: QuantizeConfig, result: QuantizeResult, console: Any) -> QualityReport:
    """Quality report of the result against the f16 intermediate (or the HF model)."""
    settings = config.report or ReportSettings()
    original = result.intermediate if config.report_against == "gguf" and result.qtype.stage == "quantize" else result.hf_folder
    if original is None:
        original = result.intermediate
    assert original is not None
    labels = ("HF" if original == result.hf_folder else original.stem.removeprefix("intermediate-").upper(), result.qtype.label)
    with console.status("report") as status:
        return compare_models(original, result.path, settings, status=lambda msg: status.update(f"report: {msg}"), labels=labels)


# ---------------------------------------------------------------------------------------------
# Cache entries and helpers


def _cache_root(config: QuantizeConfig) -> Path:
    return config.cache_root or quantize_cache_root()


@contextmanager
def _entry_dir(root: Path, key: str, use_cache: bool) -> Iterator[Path]:
    """The cache folder for ``key``, or (without the cache) a ``<pid>-`` folder in the temp folder removed at the end."""
    if use_cache:
        entry = root / key
        entry.mkdir(parents=True, exist_ok=True)
        yield entry
        return
    with tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-{key}.", dir=temp_folder(root)) as tmp:
        yield Path(tmp)


def _from_cache(result_path: Path, record_path: Path, qtype: QuantType, key: str, source: _Source, entry: Path) -> QuantizeResult:
    read_gguf_info(result_path)  # a damaged entry fails here rather than in the user's chat
    record = json.loads(record_path.read_text())
    fallbacks = [Fallback(**f) for f in record.get("fallbacks", [])]
    verification = Verification(**record.get("verification", {}))
    intermediate = source.gguf or next(iter(sorted(entry.glob("intermediate-*.gguf"))), None)
    return QuantizeResult(result_path, qtype, True, fallbacks, verification, key, source.hf_folder, intermediate,
                          imatrix=record.get("imatrix"))


def _check_space(source: _Source, qtype: QuantType, entry: Path) -> None:
    if source.hf_folder is not None:
        n_params = count_params(source.hf_folder)
        stage1 = _stage1_type(source, qtype)
        cached = (entry / f"intermediate-{stage1}.gguf").is_file()
        intermediate = None if cached else get_quant_type(stage1)
    else:
        assert source.gguf is not None
        n_params, intermediate = read_gguf_info(source.gguf).n_params, None
    require_free_space(entry, planned_bytes(n_params, qtype, intermediate), f"the {qtype.label} GGUF of {source.model_id}")


@contextmanager
def _timed(seconds: dict[str, float], name: str, console: Any, title: str) -> Iterator[None]:
    console.print(title)
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start
    console.print(f"    [dim]{name} done in {seconds[name]:.1f}s[/dim]")
