"""The Models panel above the tabs: which model is the policy and which the reference, with Load buttons.

A model that fails to load shows its one-line error here; the app keeps running with the other,
and a Load that fails keeps the model that was working (the line says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tandemlm.errors import EngineError
from tandemlm.ui.engines import EngineSlot

if TYPE_CHECKING:
    import gradio as gr


def slots_status(slots: dict[str, EngineSlot]) -> str:
    """One status line per slot, as Markdown."""
    return "  \n".join(slot.status() for slot in slots.values())


def load_slot(slots: dict[str, EngineSlot], role: str, model: str, backend: str) -> str:
    """Loads ``model`` into ``role`` now, swapping only once it loaded; returns the panel status (errors included).

    A model that fails to load leaves the working one in the slot, and the status line says both.
    """
    slot = slots[role]
    if not (model or "").strip():
        message = f"type a {role} model (built-in name, folder, .gguf, hub id or run folder)"
        if slot.loaded:
            slot.failed = message
        else:
            slot.error = message
        return slots_status(slots)
    try:
        slot.load(model, backend)
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


def panel_label(slots: dict[str, EngineSlot]) -> str:
    """The panel's title: each role's model (file or folder name only), marked ✓ loaded or ⚠ failed."""
    parts = []
    for role, slot in slots.items():
        name = Path(slot.model).name or slot.model
        mark = " ⚠" if slot.problem else " ✓" if slot.loaded else ""
        parts.append(f"{role} {name}{mark}")
    return "Models: " + " · ".join(parts)


def panel_values(slots: dict[str, EngineSlot]) -> list[str]:
    """What the boxes should show now, in :attr:`ModelsPanel.fields` order: each role's model, then its backend.

    On page load the boxes take these, so a reload shows the models actually in the slots (not the
    launch defaults) and pressing Load swaps nothing by surprise.
    """
    return [value for slot in slots.values() for value in (slot.model, slot.backend)]


@dataclass
class ModelsPanel:
    """The panel's components other tabs update (the Runs tab loads a run's policy)."""

    boxes: dict[str, gr.Textbox]
    backends: dict[str, gr.Dropdown]
    status: gr.Markdown
    accordion: gr.Accordion

    @property
    def fields(self) -> list[gr.components.Component]:
        """Each role's model box then its backend dropdown, the order of :func:`panel_values`."""
        return [field for role in self.boxes for field in (self.boxes[role], self.backends[role])]


def build_models_panel(slots: dict[str, EngineSlot]) -> ModelsPanel:
    """Lays out the panel (one row: each role's model, backend and Load); call inside ``gr.Blocks``."""
    import gradio as gr

    choices = backend_choices()
    boxes, backends, loads = {}, {}, {}
    with gr.Accordion(panel_label(slots), open=True, elem_id="models-panel") as accordion:
        # One row, no field labels: the buttons say the roles (a 700 px tall screen keeps the chat in view).
        with gr.Row():
            for role, slot in slots.items():
                boxes[role] = gr.Textbox(
                    slot.model, label=f"{role} model", show_label=False, container=False, lines=1, scale=4,
                    min_width=160, placeholder=f"{role}: name, folder, .gguf, hub id or run folder",
                    elem_id=f"model-{role}",
                )
                backends[role] = gr.Dropdown(
                    choices, value=slot.backend, label=f"{role} backend", show_label=False, container=False,
                    scale=1, min_width=100, elem_id=f"model-{role}-backend",
                )
                loads[role] = gr.Button(f"Load {role}", size="md", scale=0, min_width=130, elem_id=f"model-{role}-load")
        status = gr.Markdown(slots_status(slots), elem_id="model-status")
    for role, button in loads.items():
        button.click(
            lambda model, name, role=role: load_slot(slots, role, model, name), [boxes[role], backends[role]], status
        )
    # Whatever changed the slots (a Load here, the Runs tab, training), the title follows.
    status.change(lambda: gr.Accordion(label=panel_label(slots)), outputs=accordion, queue=False)
    return ModelsPanel(boxes=boxes, backends=backends, status=status, accordion=accordion)
