"""The alignment methods by name, and reading a run back with its method's config class.

This is the only module that imports every method module; the CLI builds one command per method
from :func:`methods`. Each method module declares ``METHOD = Method(ConfigClass, run_<method>,
description)`` and imports TRL inside ``run_<method>``, so importing them costs nothing. A new
method adds its ``METHOD`` to :data:`_BUILTIN`.
"""

from __future__ import annotations

import os
from typing import Any

from tandemlm.align import dpo, kto, ppo, reward_model, sft
from tandemlm.align.config import make_config, read_yaml
from tandemlm.align.run import Method, Run
from tandemlm.align.run_folder import CONFIG_FILE, read_run_folder

_BUILTIN: tuple[Method, ...] = (sft.METHOD, reward_model.METHOD, dpo.METHOD, kto.METHOD, ppo.METHOD, *ppo.GROUP_METHODS)
_METHODS: dict[str, Method] = {method.name: method for method in _BUILTIN}


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    return dict(_METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the known ones."""
    if name not in _METHODS:
        raise KeyError(f"unknown alignment method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def run_method(name: str, config: Any) -> Run:
    """Runs method ``name`` with ``config`` (an instance of its config class)."""
    return get_method(name).start(config)  # type: ignore[return-value]


def open_run(path: str | os.PathLike[str]) -> Run:
    """A finished (or interrupted) run folder, with its config read as its method's config class."""
    folder = read_run_folder(path)
    values = read_yaml(folder.dir / CONFIG_FILE)
    config_cls = get_method(folder.method).config_cls
    return Run(folder.dir, make_config(config_cls, values, source=str(folder.dir / CONFIG_FILE)))
