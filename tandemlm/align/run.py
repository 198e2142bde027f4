"""The run machinery every method shares (PPO included): run folder, checkpoints, resume, final save.

A run folder holds::

    config.yaml       the resolved config (auto fields filled in), written before training starts
    run.json          method, base model, adapter or full weights, status, wall time per session
    metrics.jsonl     one line per log step (see callbacks.py), cut back to the checkpoint on resume
    plots/*.png       loss, reward, KL, chosen/rejected margins, response length
    checkpoints/      the trainer's checkpoint-N folders
    final/            the trained model (LoRA adapter or full weights) with its tokenizer
    merged/           base + adapter merged (``tandem merge``), a plain HF folder

Checkpoints: the trainer writes ``trainer_state.json`` last, so a checkpoint counts as complete
only when that file parses; ``--resume`` deletes incomplete ones (a kill -9 mid-save) and continues
from the newest complete one, losing at most ``save_steps`` steps. Final weights and every small
file are written to a temp name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.config import AlignConfig, ConfigError, make_config, read_yaml, resolve_auto, to_dict

if TYPE_CHECKING:
    from transformers import Trainer

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
DEFAULT_RUNS_DIR = "runs"
# Fields that must match when resuming: anything else (max_steps, save_steps, ...) may change.
IDENTITY_FIELDS = ("model", "dataset", "lora", "qlora", "lora_r", "lora_target", "lora_layers")


@dataclass
class Run:
    """One run folder and its resolved config."""

    dir: Path
    config: AlignConfig

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def metrics(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def plots(self) -> Path:
        return self.dir / "plots"

    def info(self) -> dict[str, Any]:
        """The contents of run.json ({} before it is written)."""
        path = self.dir / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def update_info(self, **values: Any) -> None:
        if is_main_process():
            atomic_write_text(self.dir / RUN_FILE, json.dumps({**self.info(), **values}, indent=2) + "\n")

    @property
    def base_model(self) -> Path:
        """The HF folder the run started from (the reference model of DPO/GRPO/KTO)."""
        return Path(self.info()["base_model"])

    @property
    def is_adapter(self) -> bool:
        return bool(self.info().get("adapter"))

    def model_folder(self) -> Path:
        """A plain HF folder with the trained weights: merged/ for LoRA runs, final/ otherwise."""
        if not (self.final.is_dir() or self.merged.is_dir()):
            raise ConfigError(f"run {self.dir} has no trained model yet (final/ is missing); finish or --resume it")
        if self.is_adapter:
            if not self.merged.is_dir():
                raise ConfigError(f"run {self.dir} trained a LoRA adapter; merge it first: tandem merge {self.dir}")
            return self.merged
        return self.final


# ---------------------------------------------------------------------------------------------
# Processes: under `accelerate launch` only the main process writes run files.


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _same_on_all_processes(value: Any) -> Any:
    """The main process's ``value`` on every process (a timestamped run name must not differ)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


# ---------------------------------------------------------------------------------------------
# Starting or resuming a run


def prepare_run(config: AlignConfig, base_model: Path) -> Run:
    """Resolves auto fields, picks the run folder and writes config.yaml and run.json.

    A new run refuses a folder that already holds a run (nothing is overwritten); ``resume``
    requires one, with the same model and data.
    """
    config = resolve_auto(config)
    folder = _run_folder(config)
    run = Run(folder, config)
    saved = folder / CONFIG_FILE
    if config.resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {folder} holds no run to resume ({CONFIG_FILE} is missing)")
        _check_resumable(config, read_yaml(saved), saved)
    elif saved.is_file() or (folder / RUN_FILE).is_file():
        raise ConfigError(f"output_dir {folder} already holds a run; pass --resume to continue it or pick another --output-dir")
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        _write_yaml(saved, to_dict(config))
        info = run.info()
        sessions = [*info.get("sessions", []), {"started": _now(), "resumed_from": None}]
        run.update_info(
            method=config.method, model=config.model, base_model=str(base_model), adapter=config.uses_lora,
            status="running", sessions=sessions,
        )
    wait_for_everyone()
    return run


def _run_folder(config: AlignConfig) -> Path:
    if config.output_dir:
        return Path(config.output_dir).expanduser().resolve()
    runs = Path(DEFAULT_RUNS_DIR).resolve()
    if config.resume:
        latest = sorted(runs.glob(f"{config.method}-*"), key=lambda p: p.stat().st_mtime)
        if not latest:
            raise ConfigError(f"--resume: no {config.method} runs under {runs}; pass --output-dir RUN")
        return latest[-1]
    name = _same_on_all_processes(f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    return runs / name


def _check_resumable(config: AlignConfig, saved: dict[str, Any], path: Path) -> None:
    for name in IDENTITY_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"--resume: {name} is {getattr(config, name)!r} but the run in {path.parent} used {saved[name]!r}"
            )


def open_run(path: str | os.PathLike[str]) -> Run:
    """A finished (or interrupted) run folder, with its config."""
    from tandemlm.align.registry import get_method

    folder = Path(path).expanduser().resolve()
    if not (folder / RUN_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder} is not a run folder ({RUN_FILE} or {CONFIG_FILE} is missing)")
    values = read_yaml(folder / CONFIG_FILE)
    method = json.loads((folder / RUN_FILE).read_text())["method"]
    return Run(folder, make_config(get_method(method).config_cls, values, source=str(folder / CONFIG_FILE)))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (written last) parses, oldest first."""
    found = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX) :]
        if step.isdigit() and _state_step(path) is not None:
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def _state_step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run: Run) -> Path | None:
    """The newest complete checkpoint, after removing any a crash left half-written."""
    if not run.checkpoints.is_dir():
        return None
    complete = complete_checkpoints(run.checkpoints)
    if is_main_process():
        for path in run.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):
            if path not in complete:
                shutil.rmtree(path, ignore_errors=True)
    wait_for_everyone()
    return complete[-1] if complete else None


# ---------------------------------------------------------------------------------------------
# Trainer arguments, training, final save


def trainer_args(config_cls: type, run: Run, has_eval: bool, **method_fields: Any) -> Any:
    """A TRL config (``config_cls``) from the run's common fields plus the method's own."""
    import torch

    c = run.config
    evaluating = has_eval and c.eval_steps > 0
    values: dict[str, Any] = {
        "output_dir": str(run.checkpoints),
        "max_steps": c.max_steps,
        "num_train_epochs": c.epochs,
        "learning_rate": c.learning_rate,
        "lr_scheduler_type": c.lr_scheduler,
        "warmup_steps": c.warmup_steps,
        "per_device_train_batch_size": c.batch_size,
        "per_device_eval_batch_size": c.batch_size,
        "gradient_accumulation_steps": c.grad_accum,
        "seed": c.seed,
        "gradient_checkpointing": bool(c.gradient_checkpointing),
        "bf16": bool(c.bf16),
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "steps",
        "save_steps": c.save_steps,
        "save_total_limit": c.save_total_limit,
        "logging_steps": c.logging_steps,
        "eval_strategy": "steps" if evaluating else "no",
        "eval_steps": c.eval_steps if evaluating else None,
        "report_to": [] if c.report_to == "none" else [c.report_to],
        "disable_tqdm": True,  # the rich progress bar replaces tqdm
        "dataloader_num_workers": 0,
        "trust_remote_code": c.trust_remote_code,
    }
    if c.gradient_checkpointing:
        values["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    values.update(method_fields)
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in c.trl_args:
        if key not in known:
            raise ConfigError(f"trl_args: {config_cls.__name__} has no field {key!r}")
    values.update(c.trl_args)
    return config_cls(**{k: v for k, v in values.items() if k in known})


def train(trainer: Trainer, run: Run) -> Run:
    """Trains (resuming if asked), saves final/ atomically and records the session in run.json."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tandemlm.align.callbacks import HackingWatch, MetricsLogger, RichProgress

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(MetricsLogger(run))
    trainer.add_callback(HackingWatch(run))
    trainer.add_callback(RichProgress(run.config.method))
    resume_from = latest_checkpoint(run) if run.config.resume else None
    if resume_from is not None:
        _record_session(run, resumed_from=resume_from.name)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final(trainer, run)
    if _num_processes() > 1:
        run.update_info(rank_digests=rank_digests(trainer.model))
    _record_session(run, finished=_now(), seconds=round(time.monotonic() - started, 1), steps=trainer.state.global_step)
    run.update_info(status="finished", global_step=trainer.state.global_step)
    return run


def rank_digests(model: Any) -> list[str]:
    """A digest of the trainable weights from every process (data-parallel ranks must agree).

    Recorded in run.json for multi-process runs: a cheap check that every rank took the same steps.

    Under ZeRO-3 each rank holds only a shard, so the digests differ by design.
    """
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return gather_object([digest.hexdigest()[:16]])


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def save_final(trainer: Trainer, run: Run) -> Path:
    """Saves the model and tokenizer to final/ through a temp folder (every process joins the save)."""
    staging = run.dir / ".final.partial"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    wait_for_everyone()
    trainer.save_model(str(staging))
    wait_for_everyone()
    if is_main_process():
        _drop_trainer_files(staging)
        replace_dir(staging, run.final)
    wait_for_everyone()
    return run.final


def _drop_trainer_files(folder: Path) -> None:
    """training_args.bin is a pickle; final/ keeps only safetensors, JSON and tokenizer files."""
    (folder / "training_args.bin").unlink(missing_ok=True)


def replace_dir(staging: Path, target: Path) -> None:
    """Moves a finished ``staging`` folder to ``target``, replacing any old one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)


def _record_session(run: Run, **values: Any) -> None:
    sessions = run.info().get("sessions") or [{}]
    sessions[-1] = {**sessions[-1], **values}
    wall = sum(s.get("seconds", 0) for s in sessions)
    run.update_info(sessions=sessions, wall_time_s=round(wall, 1))


# ---------------------------------------------------------------------------------------------
# Small atomic writers


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_yaml(path: Path, values: dict[str, Any]) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
