"""Run configurations: one typed dataclass per method, mirrored to YAML and CLI flags.

Precedence: field defaults < ``--preset NAME`` < ``--config FILE.yaml`` < flags. Every field has a
help string (shown by ``tandem align METHOD --help``); ``__post_init__`` checks types and ranges and
names the field at fault. Fields left ``None`` mean "auto": :func:`resolve_auto` fills them for the
hardware the run lands on (LoRA, gradient checkpointing and bf16 on a GPU; plain fp32 on a CPU).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tandemlm.models.builtin import DEFAULT_MODEL

C = TypeVar("C", bound="AlignConfig")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field, file or flag."""


def _f(default: Any, help: str) -> Any:
    """A dataclass field with an immutable default, carrying its help string (the CLI reads it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class AlignConfig:
    """Fields every method shares. Subclasses add the method's own knobs."""

    # ---- what to train on ---------------------------------------------------------------------
    model: str = _f(DEFAULT_MODEL, "Base model: a built-in name (smollm2), an HF folder, or a hub id.")
    dataset: str = _f("", "Training data: .jsonl/.json/.parquet file, a `datasets` folder, or builtin:NAME.")
    eval_dataset: str | None = _f(None, "Held-out data (same formats) for eval during training and `align eval`.")
    output_dir: str | None = _f(None, "Run folder; default runs/<method>-<timestamp>.")
    # ---- schedule -----------------------------------------------------------------------------
    max_steps: int = _f(100, "Optimizer steps to train for; -1 trains for `epochs` instead.")
    epochs: float = _f(1.0, "Passes over the data when max_steps is -1.")
    learning_rate: float = _f(1e-5, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule: constant, linear, cosine, ... (transformers names).")
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    batch_size: int = _f(4, "Examples per device per step (preference pairs count once).")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum * processes).")
    max_length: int = _f(1024, "Longest tokenized example (prompt + response); longer ones are truncated.")
    seed: int = _f(0, "Random seed (data order, LoRA init, sampling).")
    # ---- memory discipline (None = auto for the hardware) ---------------------------------------
    lora: bool | None = _f(None, "Train LoRA adapters instead of all weights (auto: on with a GPU, off on CPU).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA path.")
    lora_target: str = _f("all-linear", "Modules that get adapters: all-linear or a comma list (q_proj,v_proj).")
    lora_layers: int | None = _f(None, "Adapt only the last N transformer layers (backward stops there: cheap on CPU).")
    qlora: bool = _f(False, "Load the base in 4-bit (bitsandbytes NF4) under the LoRA adapters; needs a CUDA GPU.")
    gradient_checkpointing: bool | None = _f(None, "Recompute activations in backward to save memory (auto: on with a GPU).")
    bf16: bool | None = _f(None, "bfloat16 mixed precision (auto: on with a GPU that supports it).")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default). 1 is faster on a busy machine.")
    trust_remote_code: bool = _f(False, "Run custom model code from the checkpoint.")
    # ---- checkpoints, logging, eval ---------------------------------------------------------------
    save_steps: int = _f(50, "Checkpoint every N steps; a crash loses at most this many steps.")
    save_total_limit: int = _f(2, "Checkpoints kept (older ones are deleted once a newer one is complete).")
    logging_steps: int = _f(1, "Log metrics every N steps (metrics.jsonl, plots, progress bar).")
    eval_steps: int = _f(0, "Evaluate on eval_dataset every N steps during training (0 = never; see tandem align eval).")
    eval_prompts: int = _f(64, "Held-out prompts used by `tandem align eval`.")
    eval_max_new_tokens: int = _f(64, "Tokens generated per held-out prompt by `tandem align eval`.")
    resume: bool = _f(False, "Continue the run in output_dir from its last complete checkpoint.")
    report_to: str = _f("none", "Extra loggers for transformers (none, tensorboard, wandb, ...).")
    trl_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "YAML only: extra fields for the TRL config class, passed through as is."}
    )

    method: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_types(self)
        _positive(self, "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha", "save_steps")
        _positive(self, "save_total_limit", "logging_steps", "eval_prompts", "eval_max_new_tokens")
        _non_negative(self, "warmup_steps", "eval_steps", "threads")
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

    @property
    def uses_lora(self) -> bool:
        """Whether adapters are trained (after :func:`resolve_auto`, ``lora`` is never None)."""
        return bool(self.lora or self.qlora)


def _positive(config: AlignConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(config, name)}")


def _non_negative(config: AlignConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be zero or more, got {getattr(config, name)}")


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
    return make_config(cls, values, source="config")


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------------------------------------
# One config per method. Defaults suit a 1.5B-7B model on one 24 GB GPU; presets and recipes adapt.


@dataclass
class SFTRunConfig(AlignConfig):
    """Supervised fine-tuning on conversations (``messages``) or prompt/completion pairs."""

    method: typing.ClassVar[str] = "sft"
    learning_rate: float = _f(2e-5, "Peak learning rate.")
    completion_only_loss: bool = _f(True, "Prompt/completion data: train only on the completion tokens.")
    packing: bool = _f(False, "Pack several short examples into each max_length row.")


@dataclass
class RewardRunConfig(AlignConfig):
    """A Bradley-Terry reward model (a scalar head on the base) from chosen/rejected pairs."""

    method: typing.ClassVar[str] = "reward"
    learning_rate: float = _f(1e-4, "Peak learning rate.")
    center_rewards_coefficient: float | None = _f(None, "Pulls mean reward toward 0 (1e-2 is typical; unset = off).")


@dataclass
class DPORunConfig(AlignConfig):
    """Direct preference optimisation from chosen/rejected pairs against a frozen reference."""

    method: typing.ClassVar[str] = "dpo"
    learning_rate: float = _f(5e-6, "Peak learning rate.")
    beta: float = _f(0.1, "Strength of the pull toward the reference (higher = stay closer).")
    loss_type: str = _f("sigmoid", "DPO loss(es), comma list: sigmoid (the paper), ipo, hinge, sft (NLL of chosen), ...")
    loss_weights: str | None = _f(None, "Weights of the losses in loss_type, comma list (default 1 each); sigmoid,sft = RPO.")
    precompute_ref_log_probs: bool = _f(False, "Score the data with the reference once up front (saves memory).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if self.loss_weights is not None and len(self.loss_weight_list) != len(self.loss_types):
            raise ConfigError(f"loss_weights needs one weight per loss in loss_type ({', '.join(self.loss_types)})")

    @property
    def loss_types(self) -> list[str]:
        return [name.strip() for name in self.loss_type.split(",") if name.strip()]

    @property
    def loss_weight_list(self) -> list[float] | None:
        if self.loss_weights is None:
            return None
        try:
            return [float(w) for w in self.loss_weights.split(",")]
        except ValueError:
            raise ConfigError(f"loss_weights must be numbers separated by commas, got {self.loss_weights!r}") from None


@dataclass
class KTORunConfig(AlignConfig):
    """Kahneman-Tversky optimisation from thumbs-up/down examples (pairs are split into both)."""

    method: typing.ClassVar[str] = "kto"
    learning_rate: float = _f(5e-6, "Peak learning rate.")
    beta: float = _f(0.1, "Strength of the pull toward the reference.")
    desirable_weight: float = _f(1.0, "Loss weight of desirable (chosen) examples.")
    undesirable_weight: float = _f(1.0, "Loss weight of undesirable (rejected) examples.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")


@dataclass
class GRPORunConfig(AlignConfig):
    """Group-relative policy optimisation: sample a group per prompt, reward it, push above-average ones."""

    method: typing.ClassVar[str] = "grpo"
    learning_rate: float = _f(1e-6, "Peak learning rate.")
    batch_size: int = _f(8, "Completions per device per step (a multiple of num_generations with grad_accum).")
    rewards: str = _f("verifier", "Reward functions with weights, e.g. verifier or verifier:1,reward_model:0.5.")
    reward_model: str | None = _f(None, "A reward run folder (tandem align reward) for the reward_model reward.")
    num_generations: int = _f(8, "Completions sampled per prompt (the group).")
    max_completion_length: int = _f(256, "Most tokens per sampled completion.")
    temperature: float = _f(1.0, "Sampling temperature for the group.")
    top_k: int = _f(0, "Sample among the k likeliest tokens (0 = all).")
    beta: float = _f(0.04, "KL penalty toward the reference (0 disables the reference and the KL metric).")
    num_iterations: int = _f(1, "Optimisation passes over each generated batch.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2, got {self.num_generations}")
        _positive(self, "max_completion_length", "num_iterations")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.beta < 0:
            raise ConfigError(f"beta must be zero or more, got {self.beta}")
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ConfigError(
                f"batch_size * grad_accum ({self.batch_size * self.grad_accum}) must be a multiple of "
                f"num_generations ({self.num_generations}): for grpo, batch_size counts completions"
            )
        from tandemlm.align.rewards import parse_reward_spec

        specs = parse_reward_spec(self.rewards)  # raises ConfigError naming `rewards`
        if any(name == "reward_model" for name, _ in specs) and not self.reward_model:
            raise ConfigError("rewards uses reward_model but reward_model (a reward run folder) is not set")
