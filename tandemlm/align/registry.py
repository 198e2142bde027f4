"""Alignment methods register here by name; the CLI builds one command per method from this table.

Method modules import TRL inside their ``run_<method>``, so importing them (and listing methods)
costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandemlm.align.config import AlignConfig
    from tandemlm.align.run import Run


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[AlignConfig]
    run: Callable[..., Run]
    description: str


_METHODS: dict[str, Method] = {}
# Modules that register the built-in methods when imported (PPO adds its own line).
_BUILTIN_MODULES = (
    "tandemlm.align.sft",
    "tandemlm.align.reward",
    "tandemlm.align.dpo",
    "tandemlm.align.kto",
    "tandemlm.align.grpo",
)


def register_method(config_cls: type[AlignConfig], description: str) -> Callable[[Callable[..., Run]], Callable[..., Run]]:
    """Decorator for a method's ``run_<method>(config) -> Run``; the name is ``config_cls.method``."""

    def wrap(run: Callable[..., Run]) -> Callable[..., Run]:
        _METHODS[config_cls.method] = Method(config_cls.method, config_cls, run, description)
        return run

    return wrap


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the known ones."""
    known = methods()
    if name not in known:
        raise KeyError(f"unknown alignment method {name!r}; known methods: {', '.join(sorted(known))}")
    return known[name]


def run_method(name: str, config: Any) -> Run:
    """Runs method ``name`` with ``config`` (an instance of its config class)."""
    return get_method(name).run(config)
