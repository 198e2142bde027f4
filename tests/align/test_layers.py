"""The layers of ``tandemlm.align``: a method-free lower layer, method modules above it, no import cycles.

Every ``import`` of a ``tandemlm.align`` module counts: module level, ``TYPE_CHECKING`` blocks,
inside functions, and ``importlib.import_module("tandemlm.align...")`` with a literal name. A
function-level import does not break a cycle; it only hides it.
"""

from __future__ import annotations

from pathlib import Path

import import_graph

PACKAGE = "tandemlm.align"
ROOT = import_graph.SOURCE / "align"

# Knows no method: PPO and the TRL methods build on these, and none of them imports a method module.
LOWER = {
    "tandemlm.align",  # __init__: a docstring only
    "tandemlm.align.errors",
    "tandemlm.align.metrics",
    "tandemlm.align.tasks",
    "tandemlm.align.presets",
    "tandemlm.align.sampling",
    "tandemlm.align.config",
    "tandemlm.align.launch",
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
    "tandemlm.align.compare",
}
# One module per method, the registry that lists them, and what needs a method's config class.
METHODS = {
    "tandemlm.align.sft",
    "tandemlm.align.reward_model",
    "tandemlm.align.dpo",
    "tandemlm.align.kto",
    "tandemlm.align.registry",
    "tandemlm.align.evaluate",
    "tandemlm.align.retained",  # tandem align eval's measures on quantized policies
}
METHOD_PACKAGES = ("tandemlm.align.ppo",)  # everything under these is a method module too


def _modules() -> dict[str, Path]:
    return import_graph.modules(ROOT)


def _is_method(module: str) -> bool:
    return module in METHODS or any(module == p or module.startswith(p + ".") for p in METHOD_PACKAGES)


def _graph() -> dict[str, set[str]]:
    return import_graph.graph(ROOT)


def test_every_module_is_in_a_layer():
    modules = _modules()
    unplaced = sorted(m for m in modules if m not in LOWER and not _is_method(m))
    assert not unplaced, f"add these to LOWER or METHODS in {Path(__file__).name}: {unplaced}"
    assert not LOWER & METHODS
    assert sorted((LOWER | METHODS) - set(modules)) == []  # the lists name real modules


def test_no_import_cycles_even_through_function_level_imports():
    cycle = import_graph.cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_lower_layer_imports_no_method_module():
    graph = _graph()
    bad = sorted(f"{m} imports {t}" for m in graph if not _is_method(m) for t in graph[m] if _is_method(t))
    assert not bad, "the lower layer must not know any method:\n" + "\n".join(bad)


def test_only_the_registry_imports_every_method():
    graph = _graph()
    builtin = {"tandemlm.align.sft", "tandemlm.align.reward_model", "tandemlm.align.dpo", "tandemlm.align.kto", "tandemlm.align.ppo"}
    assert builtin <= graph["tandemlm.align.registry"]
    assert [m for m, targets in graph.items() if builtin <= targets] == ["tandemlm.align.registry"]
