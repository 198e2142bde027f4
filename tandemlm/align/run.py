"""Starting, resuming and finishing a training run: the part of the run machinery that needs its config.

:class:`Run` is a :class:`~tandemlm.align.run_folder.RunFolder` (the files) with the resolved config.
:func:`prepare_run` writes config.yaml and run.json before training, refuses to overwrite a run and
checks that a resumed one trains the same model on the same data; :func:`train` runs a
transformers ``Trainer`` with the shared callbacks, resumes from the newest complete checkpoint
(losing at most ``save_steps`` steps), saves final/ atomically and records the session.
:class:`Method` is what each method module declares (``METHOD``) for ``registry`` to list.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.config import DEFAULT_RUNS_DIR, AlignConfig, read_yaml, resolve_auto, to_dict
from tandemlm.align.errors import ConfigError, RunFinished
from tandemlm.align.run_folder import (
    CONFIG_FILE,
    RUN_FILE,
    RunFolder,
    is_main_process,
    latest_checkpoint,
    num_processes,
    same_on_all_processes,
    save_final,
    wait_for_everyone,
)
from tandemlm.storage.atomic import atomic_write_text

if TYPE_CHECKING:
    from transformers import Trainer

# Fields that must match when resuming: anything else (max_steps, save_steps, ...) may change.
IDENTITY_FIELDS = ("model", "dataset", "lora", "qlora", "lora_r", "lora_target", "lora_layers")
# Fields a resumed optimizer and scheduler restore from the checkpoint: a new value would be written
# into config.yaml but not used, so it is refused.
RESTORED_FIELDS = ("learning_rate", "lr_scheduler", "warmup_steps")


@dataclass
class Run(RunFolder):
    """One run folder and its resolved config."""

    config: AlignConfig


# The run the current method call prepared, so a failure after its folder exists can be recorded there.
_active_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("active_run", default=None)


@dataclass(frozen=True)
class Method:
    """An alignment method: its config class, ``run(config) -> Run`` and a one-line description."""

    config_cls: type[AlignConfig]
    run: Callable[..., Run]
    description: str

    @property
    def name(self) -> str:
        return self.config_cls.method

    def start(self, config: AlignConfig) -> Run | None:
        """Runs the method. A run that fails once its folder exists is marked ``failed`` in run.json,
        with the error, instead of staying ``running`` forever; ``--resume`` continues it."""
        config.validate()  # library choices, output folder: before anything loads (build_config ran it too; cheap now)
        token = _active_run.set(None)
        try:
            return self.run(config)
        except BaseException as exc:
            run = _active_run.get()
            # A run the method already stopped itself (a safety stop says "stopped") keeps its status.
            if run is not None and is_main_process() and run.info().get("status") == "running":
                run.update_info(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            _active_run.reset(token)


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
        previous = read_yaml(saved)
        _check_resumable(config, previous, saved)
        _check_not_finished(config, run)
        changed = _changed_fields(config, previous)
    else:
        changed = {}
    if not config.resume and (saved.is_file() or (folder / RUN_FILE).is_file()):
        raise ConfigError(f"output_dir {folder} already holds a run; pass --resume to continue it or pick another --output-dir")
    wait_for_everyone()  # every process has checked the folder before the main one writes into it
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        _write_yaml(saved, to_dict(config))
        info = run.info()
        session: dict[str, Any] = {"started": _now(), "resumed_from": None}
        if changed:
            session["changed"] = changed  # what this session trains with differently, per session
        sessions = [*info.get("sessions", []), session]
        run.update_info(
            method=config.method, model=config.model, base_model=str(base_model), adapter=config.uses_lora,
            status="running", sessions=sessions,
        )
    wait_for_everyone()
    _active_run.set(run)
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
    name = same_on_all_processes(f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    return runs / name


def _check_not_finished(config: AlignConfig, run: Run) -> None:
    """A finished run has nothing left to train unless ``max_steps`` now asks for more steps."""
    info = run.info()
    if info.get("status") != "finished":
        return
    done = int(info.get("global_step") or 0)
    if config.max_steps > done:
        return
    raise RunFinished(
        f"{run.dir} already finished ({done} steps; its result is in {run.final}); nothing to resume. "
        f"Pass a larger --max-steps to train on"
    )


def _changed_fields(config: AlignConfig, saved: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, now]}`` for the settings a resumed session changes."""
    now = to_dict(config)
    return {k: [saved[k], now[k]] for k in now if k in saved and saved[k] != now[k] and k != "resume"}


def _check_resumable(config: AlignConfig, saved: dict[str, Any], path: Path) -> None:
    for name in RESTORED_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"--resume: {name} is {getattr(config, name)!r} but the run in {path.parent} used {saved[name]!r}, "
                f"and a resumed optimizer and scheduler keep the run's; start a new run to change it"
            )
    for name in IDENTITY_FIELDS:
        if name in saved and saved[name] != getattr(config, name):
            raise ConfigError(
                f"--resume: {name} is {getattr(config, name)!r} but the run in {path.parent} used {saved[name]!r}"
            )


# ---------------------------------------------------------------------------------------------
# Trainer arguments and training


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

    from tandemlm.align.callbacks import HackingWatch, MetricsLogger, RichProgress  # imports transformers

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(MetricsLogger(run))
    trainer.add_callback(HackingWatch(run))
    trainer.add_callback(RichProgress(run.config.method))
    resume_from = latest_checkpoint(run) if run.config.resume else None
    if resume_from is not None:
        record_session(run, resumed_from=resume_from.name)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_final(trainer, run)
    trained = [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]
    finish_run(run, started, trainer.state.global_step, trained)
    return run


def finish_run(run: Run, started: float, steps: int, trained: list[tuple[str, Any]]) -> None:
    """Records the finished session (and, with several processes, each rank's digest of ``trained``) in run.json."""
    if num_processes() > 1:
        run.update_info(rank_digests=rank_digests(trained))
    record_session(run, finished=_now(), seconds=round(time.monotonic() - started, 1), steps=steps)
    run.update_info(status="finished", global_step=steps)


def rank_digests(trained: list[tuple[str, Any]]) -> list[str]:
    """A digest of the full named trained tensors from every process (data-parallel ranks must agree).

    Recorded in run.json for multi-process runs: a cheap check that every rank took the same steps.
    Under ZeRO-3 a rank holds only its shard of each parameter, so each one is gathered whole (one at
    a time, to keep ZeRO-3's memory bound) before it is hashed; every process must call this.
    """
    from accelerate.utils import gather_object

    return gather_object([tensor_digest(trained)])


def tensor_digest(named: list[tuple[str, Any]]) -> str:
    """A short hash of named tensors (names sorted, values as float32; ZeRO-3 parameters gathered whole):
    equal tensors give equal digests, so a saved model can be checked against a run's ``rank_digests``."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        with gathered(tensor):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def gathered(params: Any, modifier_rank: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``params`` (one tensor or a list) hold their full values: ZeRO-3 partitions
    them (shape ``(0,)`` outside). Every process must enter it. With ``modifier_rank``, what that
    process writes into them is partitioned to every process on exit."""
    params = list(params) if isinstance(params, (list, tuple)) else [params]
    partitioned = [p for p in params if hasattr(p, "ds_id")]  # DeepSpeed marks the parameters it partitions
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def record_session(run: Run, **values: Any) -> None:
    """Merges ``values`` into the current session's entry in run.json and updates the total wall time."""
    sessions = run.info().get("sessions") or [{}]
    sessions[-1] = {**sessions[-1], **values}
    wall = sum(s.get("seconds", 0) for s in sessions)
    run.update_info(sessions=sessions, wall_time_s=round(wall, 1))


# ---------------------------------------------------------------------------------------------
# Small writers


def _write_yaml(path: Path, values: dict[str, Any]) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
