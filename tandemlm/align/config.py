"""Run configurations: the fields every method shares, mirrored to YAML and CLI flags.

Each method module subclasses :class:`AlignConfig` with its own knobs (``sft.SFTRunConfig``,
``grpo.GRPORunConfig``, ...) using :func:`help_field`, :func:`check_types`, :func:`positive`;
nothing here knows a method. Defaults suit a 1.5B-7B model on one 24 GB GPU; presets and recipes adapt.

Precedence: field defaults < ``--preset NAME`` < ``--config FILE.yaml`` < flags. Every field has a
help string (shown by ``tandem align METHOD --help``); ``__post_init__`` checks types and ranges and
names the field at fault. Fields left ``None`` mean "auto": :func:`resolve_auto` fills them for the
hardware the run lands on (LoRA, gradient checkpointing and bf16 on a GPU; plain fp32 on a CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tandemlm.align.errors import ConfigError, decode_utf8
from tandemlm.align.launch import MODES
from tandemlm.models.builtin import DEFAULT_MODEL
from tandemlm.storage.atomic import unwritable_reason

C = TypeVar("C", bound="AlignConfig")
DEFAULT_RUNS_DIR = "runs"  # where runs go without --output-dir (runs/<method>-<timestamp>)


def help_field(default: Any, help: str) -> Any:
    """A config field with an immutable default, carrying its help string (CLI flags and ``--help`` read it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class AlignConfig:
    """Fields every method shares. Subclasses add the method's own knobs."""

    # ---- what to train on ---------------------------------------------------------------------
    model: str = help_field(DEFAULT_MODEL, "Base model: a built-in name (smollm2), an HF folder, or a hub id.")
    dataset: str = help_field("", "Training data: .jsonl/.json/.parquet file, a `datasets` folder, or builtin:NAME.")
    eval_dataset: str | None = help_field(None, "Held-out data (same formats) for eval during training and `align eval`.")
    output_dir: str | None = help_field(None, "Run folder; default runs/<method>-<timestamp>.")
    # ---- schedule -----------------------------------------------------------------------------
    max_steps: int = help_field(100, "Optimizer steps to train for; -1 trains for `epochs` instead.")
    epochs: float = help_field(1.0, "Passes over the data when max_steps is -1.")
    learning_rate: float = help_field(1e-5, "Peak learning rate.")
    lr_scheduler: str = help_field("cosine", "Learning-rate schedule: constant, linear, cosine, ... (transformers names).")
    warmup_steps: int = help_field(0, "Linear warm-up steps.")
    batch_size: int = help_field(4, "Examples per device per step (preference pairs count once).")
    grad_accum: int = help_field(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum * processes).")
    max_length: int = help_field(1024, "Longest tokenized example (prompt + response); longer ones are truncated.")
    seed: int = help_field(0, "Random seed (data order, LoRA init, sampling).")
    # ---- memory discipline (None = auto for the hardware) ---------------------------------------
    lora: bool | None = help_field(None, "Train LoRA adapters instead of all weights (auto: on with a GPU, off on CPU).")
    lora_r: int = help_field(16, "LoRA rank.")
    lora_alpha: int = help_field(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = help_field(0.0, "Dropout on the LoRA path.")
    lora_target: str = help_field("all-linear", "Modules that get adapters: all-linear or a comma list (q_proj,v_proj).")
    lora_layers: int | None = help_field(None, "Adapt only the last N transformer layers (backward stops there: cheap on CPU).")
    qlora: bool = help_field(False, "Load the base in 4-bit (bitsandbytes NF4) under the LoRA adapters; needs a CUDA GPU.")
    gradient_checkpointing: bool | None = help_field(None, "Recompute activations in backward to save memory (auto: on with a GPU).")
    bf16: bool | None = help_field(None, "bfloat16 mixed precision (auto: on with a GPU that supports it).")
    threads: int = help_field(0, "CPU threads for torch (0 = torch's default). 1 is faster on a busy machine.")
    trust_remote_code: bool = help_field(False, "Run custom model code from the checkpoint.")
    # ---- processes ---------------------------------------------------------------------------------
    distributed: str | None = help_field(
        None, "Start the run under accelerate launch: ddp (data parallel), zero2 or zero3 (DeepSpeed ZeRO)."
    )
    nproc: int | None = help_field(None, "Processes for --distributed (default: one per GPU, or 2 on a CPU).")
    # ---- checkpoints, logging, eval ---------------------------------------------------------------
    save_steps: int = help_field(50, "Checkpoint every N steps; a crash loses at most this many steps.")
    save_total_limit: int = help_field(2, "Checkpoints kept (older ones are deleted once a newer one is complete).")
    logging_steps: int = help_field(1, "Log metrics every N steps (metrics.jsonl, plots, progress bar).")
    eval_steps: int = help_field(0, "Evaluate on eval_dataset every N steps during training (0 = never; see tandem align eval).")
    eval_prompts: int = help_field(64, "Held-out prompts used by `tandem align eval`.")
    eval_max_new_tokens: int = help_field(64, "Tokens generated per held-out prompt by `tandem align eval`.")
    resume: bool = help_field(False, "Continue the run in output_dir from its last complete checkpoint.")
    report_to: str = help_field("none", "Extra loggers for transformers (none, tensorboard, wandb, ...).")
    trl_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "YAML only: extra fields for the TRL config class, passed through as is."}
    )

    method: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_types(self)
        positive(self, "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "save_steps")
        positive(self, "save_total_limit", "logging_steps", "eval_prompts", "eval_max_new_tokens")
        non_negative(self, "warmup_steps", "eval_steps", "threads")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be a positive integer or -1 (use epochs), got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"lora_layers must be at least 1, got {self.lora_layers}")
        if self.qlora and self.lora is False:
            raise ConfigError("qlora needs lora: set lora to true (or leave it unset)")
        if not self.model.strip():
            raise ConfigError("model must not be empty")
        self._check_processes()

    def _check_processes(self) -> None:
        if self.distributed is not None:
            one_of(self, "distributed", MODES)
        if self.nproc is not None:
            if self.distributed is None:
                raise ConfigError("nproc needs distributed (ddp, zero2 or zero3)")
            positive(self, "nproc")
        if self.qlora and self.distributed == "zero3":
            raise ConfigError("distributed: qlora does not combine with zero3 (4-bit weights cannot be sharded); use zero2 or ddp")

    def validate(self) -> None:
        """Checks that read the libraries' own lists or the filesystem; run before anything loads.

        Kept out of ``__post_init__`` because it imports transformers (seconds): a run folder's
        config is read back without it, and a bad number still fails at once. ``build_config`` and
        ``Method.start`` call it. Subclasses extend it with their own library-defined choices.
        """
        one_of(self, "lr_scheduler", lr_scheduler_names())
        check_report_to(self.report_to)
        folder = self.output_dir or DEFAULT_RUNS_DIR
        reason = unwritable_reason(Path(folder))
        if reason:
            raise ConfigError(f"output_dir {folder}: {reason}")

    @property
    def uses_lora(self) -> bool:
        """Whether adapters are trained (after :func:`resolve_auto`, ``lora`` is never None)."""
        return bool(self.lora or self.qlora)


def positive(config: AlignConfig, *names: str) -> None:
    """Raises ConfigError naming the first of ``names`` that is below 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)}")


def non_negative(config: AlignConfig, *names: str) -> None:
    """Raises ConfigError naming the first of ``names`` that is negative."""
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be zero or more, got {getattr(config, name)}")


def one_of(config: AlignConfig, name: str, choices: Iterable[str]) -> None:
    """Raises ConfigError naming ``name`` and listing ``choices`` when the field's value is not one of them."""
    choices = tuple(choices)
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@functools.cache
def lr_scheduler_names() -> tuple[str, ...]:
    """The schedules transformers' ``get_scheduler`` knows (its ``SchedulerType`` values)."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def check_report_to(value: str) -> None:
    """``report_to`` must be none, all, or a transformers integration that is installed."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = ("none", "all", *INTEGRATION_TO_CALLBACK)
    if value not in known:
        raise ConfigError(f"report_to must be one of {', '.join(known)}, got {value!r}")
    installed = get_available_reporting_integrations()
    if value not in ("none", "all") and value not in installed:
        raise ConfigError(f"report_to: {value} is not installed here; installed: {', '.join(installed) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Type checking of values that came from YAML or flags


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config class's fields (``from __future__`` makes them strings)."""
    return typing.get_type_hints(cls)


def check_types(config: Any) -> None:
    """Checks each field against its annotation, converting ints to floats where a float is wanted."""
    hints = field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        ok, converted = _conforms(value, hints[f.name])
        if not ok:
            raise ConfigError(f"{f.name} must be {_type_name(hints[f.name])}, got {value!r}")
        setattr(config, f.name, converted)


def _conforms(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            ok, converted = _conforms(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string: accept what float() reads
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if origin is dict:
        return isinstance(value, dict), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        converted = []
        for item in value:
            ok, item = _conforms(item, args[0])
            if not ok:
                return False, value
            converted.append(item)
        return True, converted
    return isinstance(value, hint), value


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is dict:
        return "a mapping"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# ---------------------------------------------------------------------------------------------
# Building a config: defaults < preset < YAML < flags


def build_config(
    cls: type[C],
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Merges preset, YAML file and flag overrides (``None`` values mean "not given") into ``cls``."""
    from tandemlm.align.presets import preset_values

    values: dict[str, Any] = {}
    if preset:
        values.update(preset_values(cls.method, preset))
    if config_file:
        values.update(read_yaml(config_file, cls))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = make_config(cls, values, source="config")
    config.validate()
    return config


def make_config(cls: type[C], values: dict[str, Any], source: str) -> C:
    """``cls(**values)`` with unknown keys reported against ``source`` and the known fields listed."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown field {unknown[0]!r} for {cls.method or 'align'}; known: {', '.join(sorted(known))}")
    return cls(**values)


def read_yaml(path: str | Path, cls: type[AlignConfig] | None = None) -> dict[str, Any]:
    """A recipe file's mapping; a ``method:`` key, if present, must match ``cls``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(decode_utf8(path.read_bytes(), str(path), ConfigError))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    method = data.pop("method", None)
    if cls is not None and method is not None and method != cls.method:
        raise ConfigError(f"{path}: recipe is for method {method!r}, not {cls.method!r}")
    if cls is not None:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{path}: unknown field {key!r}; known: {', '.join(sorted(known))}")
    return data


def to_dict(config: AlignConfig) -> dict[str, Any]:
    """The config as plain YAML-able values, with the method first."""
    return {"method": config.method, **dataclasses.asdict(config)}


def resolve_auto(config: C, cuda: bool | None = None) -> C:
    """Fills the ``None`` (auto) memory fields for the hardware: GPU gets LoRA, checkpointing, bf16."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if config.qlora and not cuda:
        raise ConfigError("qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on CPU")
    bf16_ok = cuda and _bf16_supported()
    if config.bf16 and not bf16_ok:
        raise ConfigError("bf16 needs a GPU that supports bfloat16; unset bf16 (auto) on this machine")
    changes: dict[str, Any] = {}
    if config.lora is None:
        changes["lora"] = cuda or config.qlora
    if config.gradient_checkpointing is None:
        changes["gradient_checkpointing"] = cuda
    if config.bf16 is None:
        changes["bf16"] = bf16_ok
    return dataclasses.replace(config, **changes) if changes else config


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
