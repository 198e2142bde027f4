"""What a slot's model reference loads: a model, or a LoRA run as its base with the adapter on.

A LoRA run folder (run.json says ``adapter``, ``final/`` holds the PEFT adapter) is served as
``base + adapter`` on one resident base engine (``BaseEngine.load_adapter`` / ``adapter_view``),
never merged: the reference slot naming the same base shares that engine with the adapter off.
Every other reference (built-in name, folder, .gguf, hub id, full-weights run) loads as itself
(:func:`tandemlm.ui.runs.resolve_model_ref`). Pure functions, no Gradio.

``demo:ppo-capitals`` (:data:`DEMO_POLICY`, the app's default policy) names the LoRA run shipped as
package data in ``tandemlm/data/demo_runs/ppo_capitals`` (``scripts/train_demo_adapter.sh`` makes it
with ``tandem align ppo --preset cpu-demo``): the built-in SmolLM2 with a PPO adapter trained on the
capitals verifier, so Compare shows a real policy against its base from the first click.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandemlm.align.run_folder import RunFolder, is_run_folder
from tandemlm.align.tasks import DATA_DIR
from tandemlm.errors import EngineError
from tandemlm.models.builtin import BUILTIN_MODELS
from tandemlm.ui.runs import resolve_model_ref

DEMO_POLICY = "demo:ppo-capitals"
"""The policy ``tandem ui`` opens with: the shipped PPO capitals adapter on the built-in smollm2."""
DEMO_RUNS: dict[str, Path] = {DEMO_POLICY: DATA_DIR / "demo_runs" / "ppo_capitals"}
"""Shipped demo run names -> their run folders inside the package."""


@dataclass(frozen=True)
class SlotModel:
    """What an engine loads for a slot: ``base``, and the LoRA folder to switch on (None: the base itself)."""

    base: str
    adapter: Path | None = None
    adapter_name: str = ""

    def describe(self) -> str:
        """A short phrase for the UI: ``LoRA <name> on <base>`` or the base."""
        return f"LoRA `{self.adapter_name}` on `{self.base}`" if self.adapter else f"`{self.base}`"


def run_path(ref: str | Path) -> Path:
    """The folder ``ref`` names: a shipped demo run's name (``demo:...``) is its folder in the package."""
    demo = DEMO_RUNS.get(str(ref).strip())
    return demo if demo is not None else Path(ref).expanduser()


def lora_run(ref: str | Path) -> RunFolder | None:
    """The run folder ``ref`` when it is a LoRA run with its adapter saved in ``final/``, else None."""
    path = run_path(ref)
    if not is_run_folder(path):
        return None
    run = RunFolder(path.resolve())
    try:
        adapter = run.is_adapter and (run.final / "adapter_config.json").is_file()
    except ValueError:  # run.json that does not parse: not a LoRA run we can serve
        return None
    return run if adapter else None


def base_ref(run: RunFolder) -> str:
    """The model the run started from, as the app loads it: the reference given to ``tandem align``
    (a built-in name or a path still there, so a GGUF base stays on llama.cpp), else its HF folder."""
    info = run.info()
    given, folder = str(info.get("model") or ""), str(info.get("base_model") or "")
    if given in BUILTIN_MODELS or (given and Path(given).expanduser().exists()):
        return given
    if folder and Path(folder).exists():
        return folder
    raise EngineError(f"run {run.dir}: its base model {folder or given or '(not recorded)'} is gone")


def resolve_slot_model(ref: str) -> SlotModel:
    """The model ``ref`` loads as; a LoRA run becomes its base plus its adapter. EngineError on a bad run."""
    run = lora_run(ref)
    if run is None:
        if ref.strip() in DEMO_RUNS:
            raise EngineError(
                f"the demo run {ref.strip()} is missing from this install ({DEMO_RUNS[ref.strip()]}): "
                "make it with scripts/train_demo_adapter.sh, or load another policy (e.g. smollm2)"
            )
        return SlotModel(resolve_model_ref(ref))
    return SlotModel(base_ref(run), run.final, run.dir.name)


def run_base(ref: str | Path) -> str | None:
    """The base model of the run folder ``ref`` as the reference slot should name it (None: unknown or gone)."""
    path = run_path(ref)
    if not is_run_folder(path):
        return None
    try:
        return base_ref(RunFolder(path.resolve()))
    except (EngineError, ValueError):
        return None
