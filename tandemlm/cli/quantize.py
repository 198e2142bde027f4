"""``tandem quantize`` and ``tandem eval-quant``, and the quantize step of ``tandem serve --quantize``.

Registered on the main app by :func:`register`; heavy libraries are imported inside the commands.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandemlm.cli.flag_groups import EngineFlags, ServeFlags, with_flags
from tandemlm.cli.options import EngineOptions, fail
from tandemlm.cli.quantize_ladder import check_retained, ladder, run_calibration, run_model

if TYPE_CHECKING:
    from tandemlm.deploy.engine import Engine
    from tandemlm.deploy.server.config import ServerConfig
    from tandemlm.quantize.report import QualityReport

QuantModelArg = Annotated[
    str | None, typer.Argument(help="HF folder, hub id, built-in name (smollm2), or an f32/f16/bf16 .gguf file.")
]
TypeOpt = Annotated[str, typer.Option("--type", "-t", help="Quant type, e.g. Q4_K_M, Q8_0, F16, bnb-4bit (see --list).")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all cores to quantize, the idle ones to evaluate).")]
EvalThreads = Annotated[int | None, typer.Option("--threads", help="llama.cpp threads (default: the cores not busy).")]
Window = Annotated[int, typer.Option("--window", help="Tokens per perplexity window.")]
Tokens = Annotated[int, typer.Option("--tokens", help="Most evaluation-text tokens to score (perplexity and KLD).")]
Prompts = Annotated[int, typer.Option("--prompts", help="Chat prompts to decode greedily for agreement (0 skips).")]
GreedyTokens = Annotated[int, typer.Option("--greedy-tokens", help="Greedy tokens per prompt.")]
TextFile = Annotated[Path | None, typer.Option("--text", help="Evaluation text, .txt or .jsonl (default: built-in prose + Shakespeare never calibrated on).")]
NoSpeed = Annotated[bool, typer.Option("--no-speed", help="Skip the speed rows (llama-bench pp512/tg128 of each GGUF).")]
ImatrixOpt = Annotated[str, typer.Option("--imatrix", help="Importance matrix: auto (llama-imatrix on --calibration, cached), none, or a GGUF imatrix FILE.")]
CalibrationOpt = Annotated[str, typer.Option("--calibration", help="Text for --imatrix auto: builtin (Shakespeare, never evaluated on), a .txt/.jsonl FILE, or an alignment RUN folder (its prompts and chosen answers).")]
CalibrationChunks = Annotated[int, typer.Option("--calibration-chunks", help="At most this many 512-token windows of the calibration text.")]
MaxKld = Annotated[float | None, typer.Option("--max-kld", help="Name the smallest of the --type values whose mean KLD is at most this (a ladder).")]
EvalDatasets = Annotated[list[str] | None, typer.Option("--eval", help="MODEL is an alignment run: also run its measures (verifier accuracy, reward-model score) on the unquantized and each quantized policy, on DATASET (repeatable; default: the run's eval set).")]
TargetBpw = Annotated[float | None, typer.Option("--target-bpw", help="Choose a type per tensor group for this many bits per weight, least KL divergence from a per-group sensitivity measurement (on --calibration; cached, minutes the first time).")]
EvalPrompts = Annotated[int | None, typer.Option("--eval-prompts", help="Held-out prompts --eval answers (default: the run's eval_prompts).")]


def register(app: typer.Typer) -> None:
    """Adds ``quantize`` and ``eval-quant`` to the ``tandem`` app."""
    app.command("quantize")(quantize)
    app.command("eval-quant")(eval_quant)


@with_flags(serving=ServeFlags, engine=EngineFlags)
def quantize(
    serving: ServeFlags,
    engine: EngineFlags,
    model: QuantModelArg = None,
    qtype: TypeOpt = "q4_k_m",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .gguf (default ./<model>-<TYPE>.gguf); for a ladder, its folder (default ./<model>-ladder).")] = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="LoRA adapter folder to merge into MODEL first.")] = None,
    list_types: Annotated[bool, typer.Option("--list", help="List the quant types with their bits per weight.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Measure quality vs the original; print a table, write JSON.")] = False,
    report_json: Annotated[Path | None, typer.Option("--report-json", help="Where --report writes JSON (default <out>.report.json).")] = None,
    report_against: Annotated[str, typer.Option("--report-against", help="Report's original: gguf (the f16 GGUF) or hf (transformers).")] = "gguf",
    no_speed: NoSpeed = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail when tensors fall back from the k-quant type.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither reuse nor keep cached intermediates and results.")] = False,
    threads: Threads = None,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the result over the OpenAI API when done.")] = False,
    imatrix: ImatrixOpt = "auto",
    calibration: CalibrationOpt = "builtin",
    calibration_chunks: CalibrationChunks = 64,
    max_kld: MaxKld = None,
    eval_datasets: EvalDatasets = None,
    eval_prompts: EvalPrompts = None,
    target_bpw: TargetBpw = None,
) -> None:
    """Quantize MODEL to a GGUF: convert (llama.cpp's converter), importance matrix (llama-imatrix), quantize
    (llama.cpp's quantizer), verify. Several --type values make a ladder; an alignment run folder as MODEL is
    merged first, and --eval checks that its alignment survived."""
    from tandemlm.errors import EngineError

    if list_types:
        print_types()
        return
    if model is None:
        fail("missing MODEL (an HF folder, hub id, built-in name or .gguf file); see tandem quantize --help")
    assert model is not None
    # --serve's flags are checked before the (long) quantization, not after it.
    server = serving.server()
    trust_remote_code = engine.trust_remote_code
    run = run_model(model)
    if run is not None:
        if adapter is not None:
            fail(f"--adapter: MODEL {model} is an alignment run, whose own adapter is merged")
        model, adapter = str(run.base), run.adapter
        if out is None and "," not in qtype and max_kld is None and target_bpw is None:
            out = Path.cwd() / f"{run.folder.name}-{_label(qtype)}.gguf"
    elif eval_datasets:
        fail(f"--eval measures an alignment run's policy: MODEL must be a run folder, not {model}")
    ladder_mode = "," in qtype or max_kld is not None
    if target_bpw is not None and (ladder_mode or not target_bpw > 0):
        fail(f"--target-bpw {target_bpw:g} must be a positive number of bits" if not target_bpw > 0
             else "--target-bpw makes one mixed file: drop the type list and --max-kld")
    if ladder_mode and serve and max_kld is None:
        fail("--serve after a ladder serves the smallest type within --max-kld: give --max-kld")
    try:
        from tandemlm.quantize.quant_types import get_quant_type

        row = get_quant_type(qtype.split(",")[0])
        serves_with = "transformers" if row.stage == "bitsandbytes" else "llama.cpp"
        if serve and engine.backend not in ("auto", serves_with):
            fail(f"--serve serves {row.label} with the {serves_with} backend; drop --backend {engine.backend}")
        if row.stage == "bitsandbytes" and not ladder_mode:
            _bitsandbytes(model, row, out, serve, server, engine)
            return
        settings = {"model": model, "out": out, "adapter": adapter, "threads": threads, "strict": strict,
                    "use_cache": not no_cache, "report_against": report_against, "trust_remote_code": trust_remote_code,
                    "imatrix": imatrix, "calibration": calibration, "calibration_chunks": calibration_chunks,
                    "calibration_text": run_calibration(calibration)}
        if target_bpw is not None:
            chosen = _mixed(_config(settings, "q8_0", False), target_bpw, report, not no_speed)
            results = [chosen]
        elif ladder_mode:
            folder = out or Path.cwd() / f"{Path(model).stem if model.endswith('.gguf') else Path(model).name}-ladder"
            results, chosen = ladder(_config({**settings, "out": None}, "f16", report=True, bench=not no_speed), qtype, folder, max_kld)
        else:
            results = [_run_pipeline(_config(settings, qtype, report, bench=not no_speed))]
            chosen = results[0]
        if eval_datasets and run is not None:
            check_retained(run, results, eval_datasets, eval_prompts, threads)
    except (EngineError, OSError, ValueError) as exc:
        fail(str(exc))
        return
    if not ladder_mode:
        typer.echo(str(chosen.path))
        if report and chosen.report is not None:
            _print_and_save(chosen.report, report_json or chosen.path.with_suffix(".report.json"), chosen.fallback_line())
    if serve and chosen is None:
        fail(f"no type is within --max-kld {max_kld:g}: nothing to serve")
    if serve:
        result = chosen
        engine.backend, engine.n_threads = "llama.cpp", engine.n_threads or threads
        serve_engine(_load_gguf(result.path, engine.options(server.n_parallel)), server)


def eval_quant(
    original: Annotated[str, typer.Argument(help="The original: HF folder, .gguf file or built-in name.")],
    quantized: Annotated[str, typer.Argument(help="The quantized model: .gguf file (or HF folder).")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Where to write the JSON report (default ./<B>.report.json).")] = None,
    window: Window = 512,
    tokens: Tokens = 8192,
    prompts: Prompts = 8,
    greedy_tokens: GreedyTokens = 32,
    text: TextFile = None,
    threads: EvalThreads = None,
    no_speed: NoSpeed = False,
) -> None:
    """Compare quantized model B with original A: size, perplexity, KL divergence, Δp, top-token and greedy agreement, speed."""
    from rich.console import Console

    from tandemlm.errors import EngineError
    from tandemlm.quantize.report import ReportSettings, compare_models

    console = Console(stderr=True)
    try:
        settings = ReportSettings(window, tokens, prompts, greedy_tokens, text, threads, bench=not no_speed)
        with console.status("comparing …") as status:
            report = compare_models(original, quantized, settings, status=lambda msg: status.update(msg))
    except (EngineError, OSError, RuntimeError) as exc:
        fail(str(exc))
        return
    _print_and_save(report, json_path or Path.cwd() / f"{Path(quantized).stem}.report.json")


def print_types() -> None:
    """The quant type table, as ``tandem quantize --list`` prints it."""
    from rich.console import Console
    from rich.table import Table

    from tandemlm.quantize.quant_types import QUANT_TYPES

    table = Table(title="quant types (tandem quantize MODEL --type TYPE)", title_justify="left")
    for column, justify in (("type", "left"), ("bits/weight", "right"), ("made by", "left"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    made_by = {"convert": "llama.cpp converter", "quantize": "llama.cpp quantizer", "bitsandbytes": "bitsandbytes (GPU)"}
    for row in QUANT_TYPES.values():
        table.add_row(row.label, f"{row.bits:.2f}", made_by[row.stage], row.description)
    Console().print(table)


def quantized_engine(model: str, quant: str, options: EngineOptions) -> Engine:
    """``tandem serve MODEL --quantize TYPE``: quantize (or load with bitsandbytes), verify, then load the engine."""
    from tandemlm.errors import EngineError
    from tandemlm.quantize.quant_types import get_quant_type

    try:
        row = get_quant_type(quant)
        if row.stage == "bitsandbytes":
            return _load_bitsandbytes(model, row, options)
        if options.backend not in ("auto", "llama.cpp"):
            fail(f"--quantize {row.label} makes a GGUF file, which the llama.cpp backend serves; drop --backend {options.backend}")
        from tandemlm.quantize.pipeline import QuantizeConfig

        config = QuantizeConfig(model=model, qtype=quant, threads=options.n_threads, publish=False,
                                trust_remote_code=options.trust_remote_code)
        result = _run_pipeline(config)
    except (EngineError, OSError) as exc:
        fail(str(exc))
        raise  # unreachable: fail exits
    typer.secho(f"serving the verified {row.label} GGUF {result.path}", err=True)
    return _load_gguf(result.path, replace(options, backend="llama.cpp"))


# ---------------------------------------------------------------------------------------------
# Helpers


def _mixed(config: Any, target_bpw: float, report: bool, bench: bool) -> Any:
    """``--target-bpw``: the mixed file, reported against its f16/bf16 original when asked."""
    from tandemlm.quantize.mixed import quantize_model_mixed
    from tandemlm.quantize.report import ReportSettings, compare_models

    with _termination_unwinds():
        mixed = quantize_model_mixed(config, target_bpw)
    if report and mixed.intermediate is not None:
        labels = (mixed.intermediate.stem.removeprefix("intermediate-").upper(), mixed.label)
        mixed.report = compare_models(mixed.intermediate, mixed.path, ReportSettings(n_threads=config.threads, bench=bench),
                                      labels=labels)
    return mixed


def _label(qtype: str) -> str:
    from tandemlm.errors import EngineError
    from tandemlm.quantize.quant_types import get_quant_type

    try:
        return get_quant_type(qtype).label
    except EngineError:
        return qtype  # an unknown type fails later, in one line, where every type is checked


def _config(settings: dict[str, Any], qtype: str, report: bool, bench: bool = True) -> Any:
    """The QuantizeConfig for ``qtype`` from the command's settings (a report when asked)."""
    from tandemlm.quantize.pipeline import QuantizeConfig
    from tandemlm.quantize.report import ReportSettings

    measure = ReportSettings(n_threads=settings.get("threads"), bench=bench) if report else None
    return QuantizeConfig(qtype=qtype, report=measure, **settings)


def _run_pipeline(config: Any) -> Any:
    from tandemlm.quantize.pipeline import quantize_model

    with _termination_unwinds():
        return quantize_model(config)  # prints stage progress, k-quant fallbacks and the verification to stderr


@contextmanager
def _termination_unwinds() -> Iterator[None]:
    """While quantizing, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` so ``finally`` blocks run.

    Their default action ends the process on the spot: the converter (in a process group of its
    own, so a terminal hang-up never reaches it) would run on as an orphan and the temp files
    stay. Handlers someone set on purpose (``nohup`` ignores SIGHUP) are left alone.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    replaced = [sig for sig in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(sig) == signal.SIG_DFL]
    for sig in replaced:
        signal.signal(sig, unwind)
    try:
        yield
    finally:
        for sig in replaced:
            signal.signal(sig, signal.SIG_DFL)


def _print_and_save(report: QualityReport, json_path: Path, *notes: str) -> None:
    from tandemlm.quantize.report import print_report

    print_report(report, [n for n in notes if n])
    report.write_json(json_path)
    typer.secho(f"report written to {json_path}", err=True)


def _load_gguf(path: Path, options: EngineOptions) -> Engine:
    """Loads a just-verified GGUF with the llama.cpp backend (skipping a second header check)."""
    from tandemlm.deploy.registry import load_engine
    from tandemlm.errors import EngineError
    from tandemlm.models.resolve import ModelSource

    source = ModelSource(model_id=path.stem, kind="gguf", path=path.resolve())
    try:
        return load_engine(source, "llama.cpp", options.load_options())
    except (EngineError, RuntimeError) as exc:
        fail(str(exc))
        raise


def _load_bitsandbytes(model: str, row: Any, options: EngineOptions) -> Engine:
    from tandemlm.deploy.registry import load_engine
    from tandemlm.quantize.bnb_checkpoint import require_bnb

    if options.backend not in ("auto", "transformers"):
        fail(f"--quantize {row.name} is a bitsandbytes load for the transformers backend; drop --backend {options.backend}")
    require_bnb(row)
    return load_engine(
        model, "transformers", options.load_options(), trust_remote_code=options.trust_remote_code,
        load_in_bits=row.load_in_bits,
    )


def _bitsandbytes(model: str, row: Any, out: Path | None, serve: bool, server: ServerConfig, engine: EngineFlags) -> None:
    """--type bnb-4bit/bnb-8bit: serve the bitsandbytes load, or save it as an HF folder with --out."""
    from tandemlm.errors import QuantizeError
    from tandemlm.models.resolve import resolve_model
    from tandemlm.quantize.bnb_checkpoint import require_bnb, save_bnb_checkpoint

    require_bnb(row)
    if serve:
        serve_engine(_load_bitsandbytes(model, row, engine.options(server.n_parallel)), server)
        return
    if out is None:
        raise QuantizeError(f"type {row.name} makes no GGUF: add --serve, or --out DIR to save the quantized HF checkpoint")
    folder = resolve_model(model, trust_remote_code=engine.trust_remote_code).hf_folder()
    typer.echo(str(save_bnb_checkpoint(folder, row, out, trust_remote_code=engine.trust_remote_code)))


def serve_engine(engine: Engine, server: ServerConfig) -> None:
    """Serves ``engine`` with the deploy server until interrupted."""
    from tandemlm.deploy.server.app import run_server

    run_server(engine, server)
