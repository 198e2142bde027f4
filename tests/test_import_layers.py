"""The layers of ``tandemlm``: no package imports one on its own level or above it.

From the bottom: the shared ground (``hardware``, ``errors``), ``storage`` (safe writes), ``models`` (model
references and files), ``llamacpp`` (llama.cpp's converters and programs), then ``deploy``, ``quantize`` and
``align`` side by side, then ``ui``, ``cli`` and ``testing`` (tiny test models) on top. Every
import counts, function-level ones too (see ``import_graph``): a function-level import does not
break a cycle, it only hides it. ``deploy`` and ``quantize`` share code only through the layers
below them. ``align`` may use a deploy backend (the vLLM rollout) but nothing above it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import import_graph
import pytest

# Rank of each top-level part of the package; an import must point to a strictly lower rank, or
# stay inside its own part. Exceptions, each a deliberate arrow between parts of one rank, are below.
LAYERS: dict[str, int] = {
    "tandemlm": 0,  # __init__: version only
    "tandemlm.hardware": 0,
    "tandemlm.errors": 0,
    "tandemlm.storage": 1,  # atomic writes, the pickle guard
    "tandemlm.models": 2,  # model references and files: built-in model, GGUF header, chat templates, adapters
    "tandemlm.llamacpp": 3,  # llama.cpp's converters and programs, cached (uses models.builtin's cache folder)
    "tandemlm.deploy": 4,
    "tandemlm.quantize": 4,
    "tandemlm.align": 4,
    "tandemlm.testing": 5,  # builds test models with quantize's llama.cpp converter
    "tandemlm.ui": 5,
    "tandemlm.cli": 5,
}
# Arrows allowed between two parts of the same rank.
SIDEWAYS = {
    ("tandemlm.align", "tandemlm.deploy"),  # PPO's vLLM rollout shares deploy's vLLM runtime (vllm_runtime)
    ("tandemlm.cli", "tandemlm.ui"),  # `tandem ui` opens the app
}
PACKAGES = (
    "tandemlm.storage", "tandemlm.models", "tandemlm.llamacpp", "tandemlm.deploy", "tandemlm.quantize", "tandemlm.align",
    "tandemlm.testing", "tandemlm.ui", "tandemlm.cli",
)


def _part(module: str) -> str:
    """The top-level part of ``tandemlm`` that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def _part_graph() -> dict[str, set[tuple[str, str]]]:
    """(importing part, imported part) -> the module-level arrows behind it, across parts only."""
    arrows: dict[str, set[tuple[str, str]]] = {}
    for module, targets in import_graph.graph().items():
        for target in targets:
            if _part(module) != _part(target):
                arrows.setdefault(f"{_part(module)} -> {_part(target)}", set()).add((module, target))
    return arrows


def test_every_part_is_in_a_layer():
    parts = {_part(m) for m in import_graph.modules()}
    assert sorted(parts - set(LAYERS)) == [], f"give these a layer in {Path(__file__).name}"
    assert sorted(set(LAYERS) - parts) == []  # the table names real modules


def test_no_import_cycle_between_packages():
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, targets in import_graph.graph().items():
        for target in targets:
            if _part(module) in edges and _part(target) in edges and _part(module) != _part(target):
                edges[_part(module)].add(_part(target))
    found = import_graph.cycle(edges)
    assert found is None, "package import cycle: " + " -> ".join(found or [])


def test_no_import_cycle_between_modules():
    # Module by module over the whole package, function-level imports included: stricter than the
    # package check above (it also sees a cycle inside one package, e.g. deploy.engine <-> deploy.tools).
    found = import_graph.cycle(import_graph.graph())
    assert found is None, "module import cycle: " + " -> ".join(found or [])


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    # A module-level cycle shows only when the import starts at the right module, so each module is
    # imported with no other tandemlm module loaded (fresh_imports.py: one forked child per module).
    script = Path(__file__).with_name("fresh_imports.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, "modules that fail to import on their own:\n" + done.stdout + done.stderr[-2000:]


def test_imports_point_down():
    bad = []
    for arrow, pairs in sorted(_part_graph().items()):
        source, target = arrow.split(" -> ")
        if LAYERS[target] < LAYERS[source] or (source, target) in SIDEWAYS:
            continue
        bad += [f"{m} imports {t}" for m, t in sorted(pairs)]
    assert not bad, "imports that point sideways or up:\n" + "\n".join(bad)
