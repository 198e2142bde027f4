"""CLI options shared by commands, mirroring :class:`SamplingParams` and the engine load options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandemlm.deploy.load_options import LoadOptions
from tandemlm.deploy.types import SamplingParams
from tandemlm.models.builtin import DEFAULT_MODEL

if TYPE_CHECKING:
    from tandemlm.deploy.server.config import ServerConfig

ModelArg = Annotated[str, typer.Argument(help="A built-in name (smollm2), an HF folder, a .gguf file or a hub id.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 is greedy; higher is more random.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 disables).")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens (0 disables).")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed for reproducible sampling.")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", help="Above 1 discourages repeats.")]
Backend = Annotated[str, typer.Option("--backend", help="transformers, llama.cpp, vllm or auto.")]
NCtx = Annotated[int | None, typer.Option("--n-ctx", help="llama.cpp, vllm (max_model_len): context size in tokens (shared by parallel requests).")]
NThreads = Annotated[int | None, typer.Option("--n-threads", help="llama.cpp: CPU threads (default: one per physical core).")]
NGpuLayers = Annotated[int | None, typer.Option("--n-gpu-layers", help="llama.cpp: layers to offload to the GPU (default: all on a GPU build of llama.cpp, none on a CPU build; -1: all).")]
NParallel = Annotated[int | None, typer.Option("--n-parallel", help="Most requests decoded together in one batch.")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="transformers/vllm: auto, float32, bfloat16, float16.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run custom model code from the checkpoint.")]
TensorParallel = Annotated[int, typer.Option("--tensor-parallel-size", help="vllm: split each layer across N GPUs (tensor parallel).")]
PipelineParallel = Annotated[int, typer.Option("--pipeline-parallel-size", help="vllm: split the layers into N stages, one per GPU (pipeline parallel).")]
CacheRam = Annotated[int | None, typer.Option("--cache-ram", help="llama.cpp: MiB of RAM for prompts kept after their slot is reused, restored into any slot (default 1024; 0 disables).")]
Speculative = Annotated[str | None, typer.Option("--speculative", help="llama.cpp: 'ngram' drafts tokens from n-gram matches in the prompt and output and verifies them in one batch (default: off).")]
KvLayout = Annotated[str | None, typer.Option("--kv-layout", help="llama.cpp: 'unified' (default) lets any request use the whole --n-ctx; 'split' gives each of the --n-parallel slots its own n_ctx/n_parallel cells, as llama-server -np does, and decodes many streams faster.")]
MaxQueue = Annotated[int, typer.Option("--max-queue", help="Requests that may wait for a slot before 503s (0: none wait).")]
MaxBodyMb = Annotated[float, typer.Option("--max-body-mb", help="Largest request body in MiB; larger ones get 413.")]
AllowedHosts = Annotated[
    list[str] | None,
    typer.Option("--allowed-hosts", help="Host header names to answer besides localhost and the bind address (comma-separated or repeated; * for any)."),
]

DEFAULTS = SamplingParams()
DEFAULT = DEFAULT_MODEL


@dataclass
class EngineOptions:
    """Load options for any backend; each backend takes the ones that apply to it."""

    backend: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    n_parallel: int | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    tensor_parallel_size: int | None = None  # only vLLM takes these (see parallel_backend)
    pipeline_parallel_size: int | None = None
    cache_ram: int | None = None
    speculative: str | None = None
    kv_layout: str | None = None

    def load_options(self) -> LoadOptions:
        """The load flags as typed options; the chosen backend maps them or refuses the ones it does not use."""
        return LoadOptions(
            n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers, n_parallel=self.n_parallel,
            dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size, cache_ram=self.cache_ram,
            speculative=self.speculative, kv_layout=self.kv_layout,
        )


def sampling_from_flags(**values: Any) -> SamplingParams:
    """Builds SamplingParams; a bad value exits with a one-line error that names the flag."""
    values["stop"] = values.get("stop") or []
    for stop in values["stop"]:
        require_utf8(stop, "--stop")
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        fail(flag_error(str(exc)))
        raise  # unreachable


def server_config(**values: Any) -> ServerConfig:
    """Builds the server's settings; a bad value exits with a one-line error naming the flag."""
    from tandemlm.deploy.server.config import ServerConfig

    values["allowed_hosts"] = values.get("allowed_hosts") or []
    try:
        return ServerConfig(**values)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        fail(f"--{field.replace('_', '-')} {rest}")
        raise  # unreachable


def parallel_backend(backend: str, tensor: int, pipeline: int) -> str:
    """The backend that serves one model over ``tensor`` x ``pipeline`` GPUs: vLLM, the only one that splits a model.

    ``auto`` becomes ``vllm`` when either size is above 1; another backend, or a size below 1, is one line naming the flag.
    """
    sizes = {"--tensor-parallel-size": tensor, "--pipeline-parallel-size": pipeline}
    for flag, size in sizes.items():
        if size < 1:
            fail(f"{flag} must be a positive integer, got {size}")
    asked = [flag for flag, size in sizes.items() if size > 1]
    if not asked:
        return backend
    if backend not in ("auto", "vllm"):
        fail(f"{asked[0]}: the {backend} backend runs a model on one device; only --backend vllm splits it across GPUs")
    return "vllm"


def flag_error(message: str) -> str:
    """Rewrites "top_p must be …" as "--top-p must be …"."""
    field, _, rest = message.partition(" ")
    if field in SamplingParams.__dataclass_fields__:
        return f"--{field.replace('_', '-')} {rest}"
    return message


def fail(message: str) -> None:
    """Prints ``error: message`` to stderr and exits with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def utf8_problem(text: str, what: str) -> str | None:
    """A one-line message if ``text`` holds bytes that were not UTF-8, else None.

    Python hands such bytes over (in argv, or stdin read with ``errors="surrogateescape"``) as
    lone surrogates, which no tokenizer can encode: caught here, they are a message instead of a
    UnicodeEncodeError deep inside an engine.
    """
    for index, char in enumerate(text):
        if 0xD800 <= ord(char) <= 0xDFFF:
            shown = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
            return f"{what} is not valid UTF-8 ({shown} at character {index + 1})"
    return None


def require_utf8(text: str, what: str) -> None:
    """Exits with status 2 and :func:`utf8_problem`'s one line if ``text`` is not UTF-8."""
    if problem := utf8_problem(text, what):
        fail(problem)


def named_refs(entries: list[str], flag: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` → ``{"a": "x", "b": "y"}``; a malformed or repeated entry is one line naming ``flag``."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, ref = entry.partition("=")
        if not sep or not name.strip() or not ref.strip():
            fail(f"{flag} {entry!r}: expected NAME=REF")
        if name.strip() in out:
            fail(f"{flag} {entry!r}: the name {name.strip()!r} is given twice")
        out[name.strip()] = ref.strip()
    return out


AdapterRefs = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="Serve a LoRA adapter on MODEL's weights too, as NAME=PATH (an adapter folder or an alignment run folder; "
        "repeatable); requests pick it by \"model\": NAME.",
    ),
]


def adapter_folders(entries: list[str]) -> dict[str, Path]:
    """``--adapter NAME=PATH`` entries as LoRA adapter folders (a run folder gives its ``final/``); one line per problem."""
    from tandemlm.align.errors import ConfigError
    from tandemlm.align.run_folder import is_run_folder, read_run_folder
    from tandemlm.errors import EngineError
    from tandemlm.models.adapter_files import read_adapter_config

    folders: dict[str, Path] = {}
    for name, ref in named_refs(entries, "--adapter").items():
        folder = Path(ref).expanduser()
        try:
            if is_run_folder(folder):
                run = read_run_folder(folder)
                if not run.is_adapter:
                    fail(f"--adapter {name}={ref}: that run trained full weights, not an adapter; serve it with --model {name}={run.final}")
                folder = run.final
            if not folder.is_dir():
                fail(f"--adapter {name}={ref}: {folder} is not a folder")
            read_adapter_config(folder)
        except (ConfigError, EngineError) as exc:
            message = str(exc)  # quantize's adapter checks already name the flag
            fail(message if message.startswith("--adapter") else f"--adapter {name}={ref}: {message}")
        folders[name] = folder.resolve()
    return folders
