"""``tandem align ...``: one command per registered method, built from its config dataclass.

Each config field becomes a flag with the field's help string (``lora_layers`` -> ``--lora-layers``,
booleans as ``--x/--no-x``). Flags default to "not given", so precedence stays
defaults < ``--preset`` < ``--config`` YAML < flags. Heavy libraries load inside the commands.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from tandemlm.cli.options import fail

app = typer.Typer(
    name="align",
    help="Align models: sft, reward, dpo, kto (TRL trainers); ppo, grpo, dapo, gspo, dcpo (our own RL trainer); then eval, merge, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Recipe YAML (fields of this method).")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="Built-in partial config, e.g. cpu-demo.")]


def _user_errors() -> tuple[type[Exception], ...]:
    from tandemlm.align.data import DataError
    from tandemlm.align.errors import ConfigError
    from tandemlm.errors import EngineError

    return (ConfigError, DataError, EngineError, KeyError)


def _message(exc: Exception) -> str:
    """The one-line message of a user error (a KeyError's str() is its repr, quotes and all)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _flag_annotation(name: str, hint: Any, help_text: str) -> Any:
    """``Annotated[T | None, typer.Option(...)]`` for one config field."""
    flag = "--" + name.replace("_", "-")
    base = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if base is bool:
        return Annotated[bool | None, typer.Option(f"{flag}/--no-{name.replace('_', '-')}", help=help_text)]
    return Annotated[base | None, typer.Option(flag, help=help_text)]  # type: ignore[valid-type]


def _method_command(name: str) -> Any:
    """A Typer command whose options mirror ``name``'s config dataclass."""
    from tandemlm.align.config import field_types
    from tandemlm.align.registry import get_method

    method = get_method(name)
    hints = field_types(method.config_cls)
    params = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
        inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=PresetOpt),
    ]
    fields = [f for f in dataclasses.fields(method.config_cls) if typing.get_origin(hints[f.name]) is not dict]
    for f in fields:
        annotation = _flag_annotation(f.name, hints[f.name], f.metadata.get("help", ""))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))

    def command(**kwargs: Any) -> None:
        config_file, preset = kwargs.pop("config"), kwargs.pop("preset")
        _run_method(name, config_file, preset, kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = f"{method.description} Flags override --config, which overrides --preset."
    command.__name__ = name
    return command


def _run_method(name: str, config_file: Path | None, preset: str | None, overrides: dict[str, Any]) -> None:
    from rich.console import Console

    from tandemlm.align.config import build_config
    from tandemlm.align.errors import RunFinished
    from tandemlm.align.registry import get_method

    method = get_method(name)
    try:
        config = build_config(method.config_cls, config_file, preset, overrides)
        if _launch_if_asked(name, config, config_file, preset, overrides):
            return
        run = method.start(config)
    except RunFinished as exc:  # resuming a finished run: nothing to do, and nothing wrong
        Console(stderr=True).print(str(exc))
        return
    except _user_errors() as exc:
        fail(_message(exc))
        return
    from tandemlm.align.run_folder import is_main_process

    if run is None or not is_main_process():
        return  # nothing trained (ppo --plan), or another process of accelerate launch: one summary is enough
    info = run.info()
    console = Console(stderr=True)
    console.print(
        f"[bold green]done[/] {name}: {info.get('global_step')} steps in {info.get('wall_time_s')} s -> {run.final}"
    )
    if run.is_adapter:
        console.print(f"next: tandem align eval {run.dir}   |   tandem merge {run.dir}")
    else:
        console.print(f"next: tandem align eval {run.dir}")


def _launch_if_asked(name: str, config: Any, config_file: Path | None, preset: str | None, overrides: dict[str, Any]) -> bool:
    """With ``--distributed`` (and not already launched): runs this same command under ``accelerate launch``.

    Returns whether it did; a failed launch exits with the launched command's status.
    """
    from tandemlm.align.launch import default_nproc, inside_launch, launch, launch_command

    if config.distributed is None or inside_launch():
        return False
    import torch

    cuda = torch.cuda.is_available()
    nproc = config.nproc or default_nproc(cuda)
    command = launch_command(config.distributed, nproc, _align_args(name, config_file, preset, overrides), cuda)
    status = launch(command)
    if status:
        raise typer.Exit(status)
    return True


def _align_args(name: str, config_file: Path | None, preset: str | None, overrides: dict[str, Any]) -> list[str]:
    """``METHOD`` and the flags that were given, to run the same command in the launched processes."""
    args = [name]
    if config_file is not None:
        args += ["--config", str(config_file)]
    if preset is not None:
        args += ["--preset", preset]
    for key, value in overrides.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            args += [f"--{flag}", str(value)]
    return args


def _register_methods() -> None:
    from tandemlm.align.registry import methods

    for name, method in methods().items():
        app.command(name, help=method.description)(_method_command(name))


_register_methods()


@app.command("eval")
def eval_command(
    run: Annotated[Path, typer.Argument(help="A run folder (tandem align ...).")],
    dataset: Annotated[list[str] | None, typer.Option("--dataset", help="Held-out data (repeatable); default: the run's eval_dataset.")] = None,
    reward_model: Annotated[str | None, typer.Option("--reward-model", help="A reward run to score and judge responses.")] = None,
    prompts: Annotated[int | None, typer.Option("--prompts", help="Held-out prompts to use (default: the run's eval_prompts).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Responses sampled per prompt from policy and reference.")] = 1,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Tokens per response (default: the run's eval_max_new_tokens).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 is greedy.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch (0 = default).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (a CUDA GPU when there is one, bf16/fp16), cpu (fp32) or cuda.")] = "auto",
) -> None:
    """Policy vs reference on held-out data: verifier accuracy, reward-model score, KL, win-rate, margins."""
    from tandemlm.align.evaluate import EvalOptions, evaluate_run, print_report

    options = EvalOptions(
        datasets=dataset or [], reward_model=reward_model, prompts=prompts, samples=samples,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, threads=threads, device=device,
    )
    try:
        report = evaluate_run(run, options)
    except (*_user_errors(), ValueError) as exc:
        fail(_message(exc))
        return
    print_report(report)


def merge_command(
    run: Annotated[Path, typer.Argument(help="A finished LoRA run folder.")],
    out: Annotated[Path | None, typer.Option("--out", help="Where to write the merged model (default: RUN/merged).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (the GPU when the fp32 base fits in its free memory), cpu or cuda.")] = "auto",
) -> None:
    """Merge a run's LoRA adapter into its base model: a plain safetensors folder for tandem quantize."""
    from tandemlm.align.merge import merge_run

    try:
        folder = merge_run(run, out, device)
    except (*_user_errors(), ValueError) as exc:
        fail(_message(exc))
        return
    typer.echo(str(folder))


app.command("merge")(merge_command)


@app.command("compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (tandem align ...) to put side by side.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the two-panel figure (.png).")] = Path("compare.png"),
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the rows' numbers to this JSON file.")] = None,
) -> None:
    """Runs side by side: a table of samples, train score and KL, eval gain, win-rate; a score and frontier figure."""
    from rich.console import Console

    from tandemlm.align.compare import HEADERS, read_rows, table_note, table_rows, write_figure
    from tandemlm.storage.atomic import atomic_write_text

    if out.suffix.lower() != ".png":  # checked before reading anything: nothing is half done
        fail(f"--out {out} must be a file name ending in .png")
    try:
        rows = read_rows(runs)
        figure = write_figure(rows, out)
        if json_file is not None:
            json_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json_file, json.dumps([row.as_dict() for row in rows], indent=2) + "\n")
    except OSError as exc:  # an unwritable --out or --json
        fail(f"{exc.filename or out}: {exc.strerror or exc}")
        return
    except _user_errors() as exc:
        fail(_message(exc))
        return
    console = Console()
    console.print(_compare_table(HEADERS, table_rows(rows), table_note(rows)))
    console.print(f"figure: {figure}" + (f"   rows: {json_file}" if json_file else ""))


def _compare_table(headers: list[str], rows: list[list[str]], note: str) -> Any:
    """One column per run, one line per quantity: 16 quantities side by side would not fit a terminal."""
    from rich.table import Table

    table = Table("", *(cells[0] for cells in rows), title="alignment runs", caption=note or None)
    for index, header in enumerate(headers[1:], start=1):
        table.add_row(header, *(cells[index] for cells in rows))
    return table


@app.command("make-data")
def make_data_command(
    out: Annotated[Path, typer.Argument(help="Folder to write the JSONL files into.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed (0 with the defaults reproduces the shipped files).")] = 0,
    per_country: Annotated[int, typer.Option("--per-country", help="Questions per country (1-5).")] = 2,
    arithmetic: Annotated[int, typer.Option("--arithmetic", help="Arithmetic training prompts.")] = 200,
) -> None:
    """Generate SFT, preference and verifiable-prompt data sets like the built-in ones."""
    from tandemlm.align.datagen import QUESTIONS, make_builtin_data

    if not 1 <= per_country <= len(QUESTIONS):
        fail(f"--per-country must be between 1 and {len(QUESTIONS)}")
    if arithmetic < 1:
        fail("--arithmetic must be a positive integer")
    for path in make_builtin_data(out, seed=seed, per_country=per_country, n_arithmetic=arithmetic):
        typer.echo(f"{path}\t{sum(1 for _ in path.open())} rows")


@app.command("list")
def list_command() -> None:
    """Methods, their presets, reward functions, verifiable tasks and built-in data sets."""
    from rich.console import Console
    from rich.table import Table

    from tandemlm.align.data import builtin_datasets
    from tandemlm.align.presets import PRESETS
    from tandemlm.align.registry import methods
    from tandemlm.align.rewards import reward_names
    from tandemlm.align.tasks import TASKS

    table = Table("method", "presets", "description")
    for name, method in sorted(methods().items()):
        table.add_row(name, ", ".join(PRESETS.get(name, {})) or "-", method.description)
    console = Console()
    console.print(table)
    console.print(f"rewards (--rewards of ppo, grpo, dapo, gspo, dcpo): {', '.join(reward_names())}")
    console.print("tasks (verifier): " + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    console.print(f"built-in datasets (builtin:NAME): {', '.join(builtin_datasets())}")
