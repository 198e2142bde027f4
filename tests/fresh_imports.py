"""Imports every ``tandemlm`` module in an interpreter where no other ``tandemlm`` module is loaded yet.

A module-level import cycle fails only when the import starts at the right module (``import a``
works, ``import b`` raises "partially initialized module"), so each module needs its own fresh
start. A new interpreter per module costs a torch import each time (minutes on 2 cores); instead
this script imports the third-party libraries the package uses once, then forks one child per
module: each child starts with those libraries loaded and no ``tandemlm`` module, which is all
that a cycle among our own modules depends on. Without ``os.fork`` (Windows) it starts a fresh
interpreter per module.

Run as ``python tests/fresh_imports.py``: prints one line per module that failed to import, and
exits 1 if any did.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import warnings

import import_graph


def third_party_imports() -> list[str]:
    """The non-``tandemlm`` modules that ``tandemlm`` imports at module level (outside functions)."""
    found: set[str] = set()
    for path in import_graph.modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _module_level(tree.body):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
    return sorted(name for name in found if name.split(".")[0] != "tandemlm")


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run when the module is imported: the body and its if/try blocks, not defs."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for handler in node.handlers:
                out += _module_level(handler.body)
    return out


def _import_in_child(module: str) -> str | None:
    """Imports ``module`` in a forked child; the error's last line, or None when it imported."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: import, report, and leave without running the parent's cleanup
        os.close(read)
        code = 0
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - every failure is the report
            os.write(write, f"{type(exc).__name__}: {exc}".encode()[:2000])
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return None if os.waitstatus_to_exitcode(status) == 0 else (message or f"exit status {status}")


def _import_in_interpreter(module: str) -> str | None:
    """Imports ``module`` in a new interpreter; the error's last line, or None when it imported."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


def failures() -> dict[str, str]:
    """Module -> why it failed to import on its own, for every ``tandemlm`` module."""
    can_fork = hasattr(os, "fork")
    if can_fork:
        for name in third_party_imports():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional library that is absent here; its importers fail below
                continue
    assert not [m for m in sys.modules if m.split(".")[0] == "tandemlm"], "a library imported tandemlm"
    found = {}
    for module in sorted(import_graph.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fork() with threads running": the child only imports
            error = _import_in_child(module) if can_fork else _import_in_interpreter(module)
        if error is not None:
            found[module] = error
    return found


if __name__ == "__main__":
    bad = failures()
    for module, error in bad.items():
        print(f"{module}: {error}")
    sys.exit(1 if bad else 0)
