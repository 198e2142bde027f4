"""The layers of ``tandemlm.align``: a method-free lower layer, method modules above it, no import cycles.

Every ``import`` of a ``tandemlm.align`` module counts: module level, ``TYPE_CHECKING`` blocks,
inside functions, and ``importlib.import_module("tandemlm.align...")`` with a literal name. A
function-level import does not break a cycle; it only hides it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "tandemlm.align"
ROOT = Path(__file__).resolve().parents[2] / "tandemlm" / "align"

# Knows no method: PPO and the TRL methods build on these, and none of them imports a method module.
LOWER = {
    "tandemlm.align",  # __init__: a docstring only
    "tandemlm.align.errors",
    "tandemlm.align.metrics",
    "tandemlm.align.tasks",
    "tandemlm.align.presets",
    "tandemlm.align.sampling",
    "tandemlm.align.config",
    "tandemlm.align.data",
    "tandemlm.align.datagen",
    "tandemlm.align.run_folder",
    "tandemlm.align.model",
    "tandemlm.align.plots",
    "tandemlm.align.callbacks",
    "tandemlm.align.run",
    "tandemlm.align.rewards",
    "tandemlm.align.prepare",
    "tandemlm.align.merge",
}
# One module per method, the registry that lists them, and what needs a method's config class.
METHODS = {
    "tandemlm.align.sft",
    "tandemlm.align.reward",
    "tandemlm.align.dpo",
    "tandemlm.align.kto",
    "tandemlm.align.grpo",
    "tandemlm.align.registry",
    "tandemlm.align.evaluate",
}
METHOD_PACKAGES = ("tandemlm.align.ppo",)  # everything under these is a method module too


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_method(module: str) -> bool:
    return module in METHODS or any(module == p or module.startswith(p + ".") for p in METHOD_PACKAGES)


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every ``tandemlm.align`` module that ``module`` imports, wherever the import statement sits."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:  # `from pkg import submodule` depends on the submodule, else on pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_is_in_a_layer():
    modules = _modules()
    unplaced = sorted(m for m in modules if m not in LOWER and not _is_method(m))
    assert not unplaced, f"add these to LOWER or METHODS in {Path(__file__).name}: {unplaced}"
    assert not LOWER & METHODS
    assert sorted((LOWER | METHODS) - set(modules)) == []  # the lists name real modules


def test_no_import_cycles_even_through_function_level_imports():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layer_imports_no_method_module():
    graph = _graph()
    bad = sorted(f"{m} imports {t}" for m in graph if not _is_method(m) for t in graph[m] if _is_method(t))
    assert not bad, "the lower layer must not know any method:\n" + "\n".join(bad)


def test_only_the_registry_imports_every_method():
    graph = _graph()
    builtin = {"tandemlm.align.sft", "tandemlm.align.reward", "tandemlm.align.dpo", "tandemlm.align.kto", "tandemlm.align.grpo"}
    assert builtin <= graph["tandemlm.align.registry"]
    assert [m for m, targets in graph.items() if builtin <= targets] == ["tandemlm.align.registry"]
