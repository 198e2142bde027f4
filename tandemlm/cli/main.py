"""The ``tandem`` command line. Heavy libraries are imported inside each command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandemlm.cli import options as opt
from tandemlm.cli.align import app as align_app
from tandemlm.cli.align import merge_command
from tandemlm.cli.flag_groups import EngineFlags, SamplingFlags, ServeFlags, with_flags
from tandemlm.cli.options import EngineOptions, fail
from tandemlm.cli.quantize import register as register_quantize

if TYPE_CHECKING:
    from tandemlm.deploy.engine import Engine

app = typer.Typer(
    name="tandem",
    help="Run, quantize, align and compare LLMs on one machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _load(model: str, engine_options: EngineOptions, **extra: Any) -> Engine:
    from rich.console import Console

    from tandemlm.deploy.registry import load_engine
    from tandemlm.errors import EngineError

    console = Console(stderr=True)
    try:
        with console.status(f"loading {model} …"):
            return load_engine(
                model, engine_options.backend, engine_options.load_options(),
                trust_remote_code=engine_options.trust_remote_code, **extra,
            )
    except (EngineError, KeyError, RuntimeError) as exc:
        fail(str(exc).strip("'\""))


@app.command()
def env() -> None:
    """Versions, hardware, and which backends can run here (and why not)."""
    from tandemlm.cli.env import print_env

    print_env()


@app.command()
@with_flags(engine=EngineFlags, sampling=SamplingFlags)
def generate(
    model: opt.ModelArg,
    prompt: Annotated[str, typer.Argument(help="Text to continue (no chat template).")],
    engine: EngineFlags,
    sampling: SamplingFlags,
    chat: Annotated[bool, typer.Option("--chat", help="Treat PROMPT as one user message and apply the chat template.")] = False,
) -> None:
    """Generate a completion of PROMPT and stream it to stdout."""
    from tandemlm.cli.chat import explain_empty, stream_to_terminal, tracked
    from tandemlm.errors import EngineError

    opt.require_utf8(prompt, "PROMPT")
    params = sampling.params()
    loaded = _load(model, engine.options())
    try:
        stream = loaded.chat([{"role": "user", "content": prompt}], params) if chat else loaded.generate(prompt, params)
        seen: dict[str, Any] = {}
        text, _ = stream_to_terminal(tracked(stream, seen))
        explain_empty(text, seen, model, prompt, chat)
    except EngineError as exc:
        fail(str(exc))
    finally:
        loaded.close()


@app.command()
@with_flags(engine=EngineFlags, sampling=(SamplingFlags, {"max_tokens": 512}))
def chat(
    engine: EngineFlags,
    sampling: SamplingFlags,
    model: opt.ModelArg = opt.DEFAULT,
    question: Annotated[str | None, typer.Argument(help="Ask this once, print the answer and exit (no prompt loop).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
) -> None:
    """Multi-turn terminal chat with streaming (type /reset, /system TEXT, or /exit); with QUESTION, one answer and exit."""
    from tandemlm.cli.chat import chat_loop, explain_empty, stream_to_terminal, tracked
    from tandemlm.errors import EngineError

    if system is not None:
        opt.require_utf8(system, "--system")
    if question is not None:
        opt.require_utf8(question, "QUESTION")
    params = sampling.params()
    loaded = _load(model, engine.options())
    try:
        if question is None:
            chat_loop(loaded, params, system)
        else:
            messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]
            seen: dict[str, Any] = {}
            text, _ = stream_to_terminal(tracked(loaded.chat(messages, params), seen))
            explain_empty(text, seen, model, question, True)
    except EngineError as exc:
        fail(str(exc))
    finally:
        loaded.close()


@app.command()
@with_flags(serving=ServeFlags, engine=EngineFlags)
def serve(
    serving: ServeFlags,
    engine: EngineFlags,
    model: opt.ModelArg = opt.DEFAULT,
    tensor_parallel_size: opt.TensorParallel = 1,
    pipeline_parallel_size: opt.PipelineParallel = 1,
    quantize: Annotated[str | None, typer.Option("--quantize", help="Quantize an HF MODEL to this type first (Q4_K_M, Q8_0, bnb-4bit, …), verify, then serve.")] = None,
    served_name: Annotated[str | None, typer.Option("--served-name", help="The name requests use for MODEL (default: its id).")] = None,
    extra_models: Annotated[
        list[str] | None,
        typer.Option("--model", help="Serve another model too, as NAME=REF (repeatable); requests pick it by \"model\": NAME."),
    ] = None,
    adapters: opt.AdapterRefs = None,
) -> None:
    """Serve MODEL over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/models, /tokenize, /metrics …) and Anthropic's /v1/messages."""
    from tandemlm.deploy.server.app import run_server

    # Checked before anything loads, so a bad flag costs no model load.
    config = serving.server()
    engine.backend = opt.parallel_backend(engine.backend, tensor_parallel_size, pipeline_parallel_size)
    engine_options = engine.options(config.n_parallel, tensor_parallel_size, pipeline_parallel_size)
    extras = opt.named_refs(extra_models or [], "--model")
    adapter_dirs = opt.adapter_folders(adapters or [])
    if adapter_dirs:
        _check_adapter_base(model, adapter_dirs, engine_options)
    if quantize:
        from tandemlm.cli.quantize import quantized_engine

        loaded = quantized_engine(model, quantize, engine_options)
    else:  # vLLM must know its adapters at load (LoRA on); the transformers backend loads them here too
        loaded = _load(model, engine_options, adapters=adapter_dirs or None)
    engines = {served_name or loaded.info.model_id: loaded}
    engines.update(_adapter_views(loaded, adapter_dirs, next(iter(engines))))
    for name, ref in extras.items():
        if name in engines:
            fail(f"--model {name}={ref}: the name {name!r} is already served")
        engines[name] = _load(ref, engine_options)
    run_server(engines, config)


def _check_adapter_base(model: str, adapters: dict[str, Path], engine_options: EngineOptions) -> None:
    """Before loading: an HF base must match the base each adapter records (a GGUF base is checked by llama.cpp)."""
    from tandemlm.errors import EngineError
    from tandemlm.models.adapter_files import check_recorded_base, read_adapter_config
    from tandemlm.models.resolve import resolve_model

    try:
        source = resolve_model(model, trust_remote_code=engine_options.trust_remote_code)
    except (EngineError, KeyError, ValueError):
        return  # loading the model reports it in its own words
    if source.kind == "gguf":  # llama.cpp checks each LoRA tensor's shape when it loads the adapter
        return
    for folder in adapters.values():
        try:
            check_recorded_base(folder, read_adapter_config(folder), source.hf_folder())
        except EngineError as exc:
            fail(str(exc))


def _adapter_views(engine: Engine, adapters: dict[str, Path], parent: str) -> dict[str, Engine]:
    """Each adapter, loaded on ``engine`` (unless its load did it), as an engine of its own named as given."""
    from tandemlm.deploy.engine import BaseEngine
    from tandemlm.errors import EngineError

    views: dict[str, Engine] = {}
    for name, folder in adapters.items():
        try:
            if name == parent:
                raise EngineError(f"--adapter {name}={folder}: the name {name!r} is already served (the base model)")
            if not isinstance(engine, BaseEngine):
                raise EngineError(f"the {engine.info.backend} backend cannot serve adapters")
            if name not in engine.loaded_adapters():
                engine.load_adapter(name, str(folder))
            views[name] = engine.adapter_view(name, parent)
        except EngineError as exc:
            engine.close()
            fail(str(exc))
    return views


@app.command()
def ui(
    policy: Annotated[str, typer.Option("--policy", help="Policy: a model (name, folder, .gguf, hub id) or an alignment run folder; default demo:ppo-capitals, the shipped PPO capitals LoRA on smollm2.")] = "demo:ppo-capitals",
    reference: Annotated[str | None, typer.Option("--reference", help="Reference model (default: the built-in model).")] = None,
    policy_backend: Annotated[str, typer.Option("--policy-backend", help="Backend for the policy (auto, llama.cpp, transformers, vllm).")] = "auto",
    reference_backend: Annotated[str, typer.Option("--reference-backend", help="Backend for the reference.")] = "auto",
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 7860,
    auth: Annotated[str | None, typer.Option("--auth", envvar="TANDEM_UI_AUTH", help="Require this user:pass login.")] = None,
    share: Annotated[bool, typer.Option("--share/--no-share", help="Open a public Gradio share link (off by default).")] = False,
    votes: Annotated[str, typer.Option("--votes", help="JSONL file that votes are appended to (DPO/reward data).")] = "preferences.jsonl",
    runs_dir: Annotated[str, typer.Option("--runs-dir", help="Folder of alignment runs shown in the Runs tab.")] = "runs",
    n_ctx: opt.NCtx = None,
    n_threads: opt.NThreads = None,
    n_gpu_layers: opt.NGpuLayers = None,
) -> None:
    """Open the web app: chat, compare policy vs reference (with where they diverge), vote, browse runs."""
    from pathlib import Path

    from tandemlm.ui.app import UIConfig, launch

    try:
        config = UIConfig(
            policy=policy, reference=reference, policy_backend=policy_backend, reference_backend=reference_backend,
            host=host, port=port, auth=auth, share=share, votes=Path(votes), runs_dir=Path(runs_dir), n_ctx=n_ctx,
            n_threads=n_threads, n_gpu_layers=n_gpu_layers,
        )
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        fail(f"--{field.replace('_', '-')} {rest}")
    try:
        launch(config)
    except OSError as exc:  # e.g. the port is taken
        fail(str(exc))


app.add_typer(align_app, name="align")
app.command("merge")(merge_command)
register_quantize(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
