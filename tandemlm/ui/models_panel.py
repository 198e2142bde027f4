"""The Models panel above the tabs: which model is the policy and which the reference, with Load buttons.

A model that fails to load shows its one-line error here; the app keeps running with the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tandemlm.errors import EngineError
from tandemlm.ui.engines import EngineSlot

if TYPE_CHECKING:
    import gradio as gr


def slots_status(slots: dict[str, EngineSlot]) -> str:
    """One status line per slot, as Markdown."""
    return "  \n".join(slot.status() for slot in slots.values())


def load_slot(slots: dict[str, EngineSlot], role: str, model: str, backend: str) -> str:
    """Points ``role`` at ``model`` and loads it now; returns the panel status (errors included)."""
    if not (model or "").strip():
        slots[role].error = f"type a {role} model (built-in name, folder, .gguf, hub id or run folder)"
        return slots_status(slots)
    slots[role].set(model, backend)
    try:
        slots[role].get()
    except EngineError:
        pass  # kept in the slot and shown in the status
    return slots_status(slots)


def warm_up(slots: dict[str, EngineSlot]) -> str:
    """Loads every slot that has not failed yet (the first page load triggers it); returns the status."""
    for slot in slots.values():
        if not slot.error:
            try:
                slot.get()
            except EngineError:
                pass
    return slots_status(slots)


def backend_choices() -> list[str]:
    """``auto`` plus every backend offered to users (the test-only ``mock`` is not)."""
    from tandemlm.deploy.registry import offered_backends

    return ["auto", *sorted(offered_backends())]


@dataclass
class ModelsPanel:
    """The panel's components other tabs update (the Runs tab loads a run's policy)."""

    boxes: dict[str, gr.Textbox]
    status: gr.Markdown


def build_models_panel(slots: dict[str, EngineSlot]) -> ModelsPanel:
    """Lays out the panel; call inside ``gr.Blocks``."""
    import gradio as gr

    choices = backend_choices()
    boxes, backends, loads = {}, {}, {}
    with gr.Accordion("Models", open=True):
        with gr.Row():
            for role, slot in slots.items():
                with gr.Column(), gr.Row():
                    boxes[role] = gr.Textbox(
                        slot.model, label=f"{role} (name, folder, .gguf, hub id or run)", scale=4,
                        elem_id=f"model-{role}",
                    )
                    backends[role] = gr.Dropdown(choices, value=slot.backend, label="backend", scale=1, min_width=110)
                    loads[role] = gr.Button("Load", scale=0, min_width=70, elem_id=f"model-{role}-load")
        status = gr.Markdown(slots_status(slots), elem_id="model-status")
    for role, button in loads.items():
        button.click(
            lambda model, name, role=role: load_slot(slots, role, model, name), [boxes[role], backends[role]], status
        )
    return ModelsPanel(boxes=boxes, status=status)
