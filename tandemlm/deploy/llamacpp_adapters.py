"""LoRA adapters on a llama.cpp context: load (GGUF LoRA, see ``llamacpp_lora``), check, and switch per step.

llama.cpp applies a context's adapters to every sequence it decodes, so a step decodes the
requests of one adapter only (taken in turns, ``llamacpp_lora.next_group``) with that adapter set.
:class:`LlamaCppAdapters` is the adapter half of ``LlamaCppEngine``; the engine provides the model,
context and bindings it names.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandemlm.deploy.llamacpp_lora import lora_gguf, next_group
from tandemlm.deploy.llamacpp_request import LlamaRequest
from tandemlm.deploy.types import EngineInfo
from tandemlm.errors import EngineError


class LlamaCppAdapters:
    """Adapter loading and per-step switching for an engine holding ``_ll``, ``_model`` and ``_ctx``."""

    _ll: Any  # llama_cpp's low-level bindings
    _model: Any  # the llama_cpp.Llama whose .model is the llama_model pointer
    _ctx: Any  # the llama_context the scheduler decodes with
    info: EngineInfo

    def _init_adapters(self) -> None:
        self._loras: dict[str, Any] = {}  # name -> llama_adapter_lora pointer (freed with the model)
        self._ctx_adapter: str | None = None  # the adapter set on the context now
        self._last_group: str | None = None  # the adapter the previous step decoded
        self.builtin_base: Callable[[], Path] | None = None  # a built-in model's HF folder, for conversion
        self.adapter_switches = 0  # times a step changed the context's adapter (tests read it)

    def load_adapter(self, name: str, path: str) -> None:
        """Loads the PEFT LoRA folder ``path`` as ``name``, converted to GGUF LoRA once (cached)."""
        if name in self._loras:
            raise EngineError(f"adapter {name!r} is already loaded")
        gguf = lora_gguf(path, self.builtin_base)
        adapter = self._ll.llama_adapter_lora_init(self._model.model, str(gguf).encode())
        if not adapter:  # llama.cpp checks each tensor's shape against the model's
            raise EngineError(
                f"adapter {path} does not fit {self.info.model_id}: llama.cpp refused its GGUF LoRA {gguf}"
            )
        self._loras[name] = adapter

    def loaded_adapters(self) -> list[str]:
        return list(self._loras)

    def _check_adapter(self, adapter: str | None) -> str | None:
        if adapter is not None and adapter not in self._loras:
            raise EngineError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self._loras) or 'none'})")
        return adapter

    def _adapter_group(self, active: list[LlamaRequest]) -> list[LlamaRequest]:
        """The requests this step decodes: those of one adapter, taken in turns, with it set on the context."""
        group = next_group((request.adapter for request in active), self._last_group)
        self._last_group = group
        if group != self._ctx_adapter:  # llama.cpp applies the context's adapters to every sequence
            if group is None:
                status = self._ll.llama_set_adapters_lora(self._ctx, None, 0, None)
            else:
                adapters = (self._ll.llama_adapter_lora_p_ctypes * 1)(self._loras[group])
                status = self._ll.llama_set_adapters_lora(self._ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
            if status != 0:
                raise RuntimeError(f"llama_set_adapters_lora returned {status}")
            self._ctx_adapter = group
            self.adapter_switches += 1
        return [request for request in active if request.adapter == group]
