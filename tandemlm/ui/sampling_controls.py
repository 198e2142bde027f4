"""Sampling controls shared by the Chat and Compare tabs, and their values as SamplingParams."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tandemlm.deploy.types import SamplingParams
from tandemlm.errors import EngineError

if TYPE_CHECKING:
    import gradio as gr

DEFAULTS = SamplingParams(max_tokens=256)
CONTROL_NAMES = {"max_tokens": "max tokens", "top_p": "top-p", "top_k": "top-k"}  # field -> label in the UI


def sampling_params(
    max_tokens: float, temperature: float, top_p: float, top_k: float, seed: float | None
) -> SamplingParams:
    """SamplingParams from the controls' values; a bad value raises EngineError naming the control."""
    try:
        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            seed=None if seed is None or seed == "" or int(seed) < 0 else int(seed),
        )
    except (TypeError, ValueError) as exc:
        field, _, rest = str(exc).partition(" ")
        raise EngineError(f"{CONTROL_NAMES.get(field, field)} {rest}") from None


def sampling_controls(prefix: str) -> list[gr.components.Component]:
    """Max tokens, temperature, top-p, top-k and seed, in the order :func:`sampling_params` takes them.

    Call inside a Blocks context; ``prefix`` makes the elem_ids unique per tab (``{prefix}-max-tokens``).
    """
    import gradio as gr

    return [
        gr.Slider(1, 2048, value=DEFAULTS.max_tokens, step=1, label="max tokens", elem_id=f"{prefix}-max-tokens"),
        gr.Slider(0.0, 2.0, value=DEFAULTS.temperature, step=0.05, label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="top-p"),
        gr.Slider(0, 200, value=DEFAULTS.top_k, step=1, label="top-k (0 = off)"),
        gr.Number(value=-1, precision=0, label="seed (-1 = random)", elem_id=f"{prefix}-seed"),
    ]

