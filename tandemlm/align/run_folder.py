"""A run folder as files, without its config: paths, run.json, checkpoints, the final save.

A run folder holds::

    config.yaml       the resolved config (auto fields filled in), written before training starts
    run.json          method, base model, adapter or full weights, status, wall time per session
    metrics.jsonl     one line per log step (see metrics.py), cut back to the checkpoint on resume
    plots/*.png       loss, reward, KL, chosen/rejected margins, response length
    checkpoints/      the trainer's checkpoint-N folders
    final/            the trained model (LoRA adapter or full weights) with its tokenizer
    merged/           base + adapter merged (``tandem merge``), a plain HF folder

:class:`RunFolder` reads everything but the config from run.json, so loading a run's weights
(``model.base_folder``, ``rewards.load_reward_model``, ``merge``) needs no method's config class;
``run.Run`` adds the config, and ``registry.open_run`` reads it back with the method's class.

Checkpoints: the trainer writes ``trainer_state.json`` last, so a checkpoint counts as complete
only when that file parses; ``--resume`` deletes incomplete ones (a kill -9 mid-save) and continues
from the newest complete one. Final weights and every small file are written to a temp name and
renamed. Under ``accelerate launch`` only the main process writes run files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandemlm.align.errors import ConfigError
from tandemlm.storage.atomic import atomic_write_text, replace_dir

if TYPE_CHECKING:
    from transformers import Trainer

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR, MERGED_DIR, PLOTS_DIR = "final", "merged", "plots"


@dataclass
class RunFolder:
    """One run folder; what it holds is described by run.json."""

    dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / FINAL_DIR

    @property
    def merged(self) -> Path:
        return self.dir / MERGED_DIR

    @property
    def metrics(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def plots(self) -> Path:
        return self.dir / PLOTS_DIR

    @property
    def config_file(self) -> Path:
        """config.yaml: the resolved config (read with a method's class by ``registry.open_run``)."""
        return self.dir / CONFIG_FILE

    def info(self) -> dict[str, Any]:
        """The contents of run.json ({} before it is written)."""
        path = self.dir / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_info(self) -> dict[str, Any]:
        """run.json for readers that show any folder (the UI): {} when absent, unreadable or not an object."""
        try:
            info = json.loads((self.dir / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def plot_files(self) -> list[Path]:
        """The PNGs under plots/, by name."""
        return sorted(self.plots.glob("*.png"))

    def update_info(self, **values: Any) -> None:
        if is_main_process():
            atomic_write_text(self.dir / RUN_FILE, json.dumps({**self.info(), **values}, indent=2) + "\n")

    @property
    def method(self) -> str:
        """The method that trained the run, as recorded in run.json."""
        return str(self.info()["method"])

    @property
    def base_model(self) -> Path:
        """The HF folder the run started from (the reference model of DPO/GRPO/KTO)."""
        return Path(self.info()["base_model"])

    @property
    def is_adapter(self) -> bool:
        return bool(self.info().get("adapter"))

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter was trained on a 4-bit (QLoRA) base, as config.yaml records."""
        import yaml

        try:
            config = yaml.safe_load((self.dir / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return False
        return bool(isinstance(config, dict) and config.get("qlora"))

    def model_folder(self) -> Path:
        """A plain HF folder with the trained weights: merged/ for LoRA runs, final/ otherwise."""
        if not (self.final.is_dir() or self.merged.is_dir()):
            raise ConfigError(f"run {self.dir} has no trained model yet (final/ is missing); finish or --resume it")
        if self.is_adapter:
            if not self.merged.is_dir():
                raise ConfigError(f"run {self.dir} trained a LoRA adapter; merge it first: tandem merge {self.dir}")
            return self.merged
        return self.final


def read_run_folder(path: str | os.PathLike[str]) -> RunFolder:
    """A finished (or interrupted) run folder; its config is not read (see ``registry.open_run``)."""
    folder = Path(path).expanduser().resolve()
    if not (folder / RUN_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder} is not a run folder ({RUN_FILE} or {CONFIG_FILE} is missing)")
    return RunFolder(folder)


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a run.json (a model reference may be a run folder)."""
    return (Path(path).expanduser() / RUN_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Processes: under `accelerate launch` only the main process writes run files.


def process_state() -> Any:
    """accelerate's ``PartialState`` as the trainer will set it up.

    On a CPU it must be made with ``cpu=True``: otherwise a process started by ``accelerate launch``
    finds no GPU backend, believes it is alone and main, and every process writes the run files.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return bool(process_state().is_main_process)


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def num_processes() -> int:
    return int(process_state().num_processes)


def same_on_all_processes(value: Any) -> Any:
    """The main process's ``value`` on every process (a timestamped run name must not differ)."""
    from accelerate.utils import broadcast_object_list

    if num_processes() == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


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


def latest_checkpoint(run: RunFolder) -> Path | None:
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
# The final save


def save_final(trainer: Trainer, run: RunFolder) -> Path:
    """Saves the model and tokenizer to final/ through a temp folder (every process joins the save)."""
    staging = run.dir / ".final.partial"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
    wait_for_everyone()
    trainer.save_model(str(staging))
    wait_for_everyone()
    if is_main_process():
        _drop_trainer_files(staging)
        _drop_tied_copies(staging, trainer.model)
        replace_dir(staging, run.final)
    wait_for_everyone()
    return run.final


def _drop_trainer_files(folder: Path) -> None:
    """training_args.bin is a pickle; final/ keeps only safetensors, JSON and tokenizer files."""
    (folder / "training_args.bin").unlink(missing_ok=True)


def _drop_tied_copies(folder: Path, model: Any) -> None:
    """Keeps one copy of each tied weight (the output layer tied to the embeddings) in a full-model save.

    Under ZeRO-2 accelerate's ``get_state_dict`` clones every tensor (DeepSpeed's
    ``clone_tensors_for_torch_save``), which hides the sharing ``save_pretrained`` looks for, so a tied
    weight is written twice. Dropping the later name gives what a one-process save writes.
    """
    from safetensors import safe_open

    aliases = tied_aliases(model)
    files = sorted(folder.glob("*.safetensors"))
    if not aliases or not files:
        return
    keys: dict[Path, set[str]] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            keys[file] = set(handle.keys())
    saved = set().union(*keys.values())
    drop = {alias for alias, kept in aliases.items() if alias in saved and kept in saved}
    for file, names in keys.items():
        if names & drop:
            _rewrite_without(file, names & drop)
    index = folder / "model.safetensors.index.json"
    if drop and index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if k not in drop}
        atomic_write_text(index, json.dumps(data, indent=2) + "\n")


def tied_aliases(model: Any) -> dict[str, str]:
    """``{later name: first name}`` for parameters that are one tensor under several names."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _rewrite_without(file: Path, names: set[str]) -> None:
    """Rewrites a safetensors file without ``names`` (through a temp file), keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k not in names}
    partial = file.with_name(file.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, file)
