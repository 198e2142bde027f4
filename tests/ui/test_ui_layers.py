"""The layers of ``tandemlm.ui``: the Compare tab builds on the votes package, never the other way.

``tandemlm.ui.votes`` (records, ratings, the DPO run) knows no Gradio and no Compare tab; the panels that
show it live in ``tandemlm.ui.compare``. Every import counts, function-level ones too (see ``import_graph``).
"""

from __future__ import annotations

import ast

import import_graph


def test_votes_import_nothing_from_compare():
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph.graph().items()
        if module.startswith("tandemlm.ui.votes")
        for target in targets
        if target.startswith("tandemlm.ui.compare")
    )
    assert not bad, "tandemlm.ui.votes points up into the Compare tab:\n" + "\n".join(bad)


def test_votes_import_no_gradio():
    for module, path in import_graph.modules(import_graph.SOURCE / "ui" / "votes").items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [name for name in names if name.split(".")[0] == "gradio"], module
