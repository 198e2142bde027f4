"""The app as a whole: config validation, the CLI flags, safe launch defaults, and that building loads nothing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app as cli
from tandemlm.ui import app as ui_app
from tandemlm.ui.app import UIConfig, create_app


def test_defaults_put_the_shipped_demo_adapter_against_the_builtin_model_on_localhost(monkeypatch):
    config = UIConfig()
    assert (config.policy, config.reference, config.host, config.share, config.auth) == (
        "demo:ppo-capitals", "smollm2", "127.0.0.1", False, None,
    )
    seen = []
    monkeypatch.setattr(ui_app, "launch", seen.append)
    assert CliRunner().invoke(cli, ["ui"]).exit_code == 0  # `tandem ui` with no flags opens on the demo too
    assert (seen[0].policy, seen[0].reference) == ("demo:ppo-capitals", "smollm2")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "error: --port must be between 1 and 65535, got 70000"),
        (["--auth", "alice"], "error: --auth must be user:pass with both parts non-empty"),
        (["--auth", "alice:"], "error: --auth must be user:pass with both parts non-empty"),
        (["--policy", " "], "error: --policy must name a model or run folder"),
        (["--votes", "."], "error: --votes must be a file, but . is a folder"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, message):
    result = CliRunner().invoke(cli, ["ui", *flags])
    assert result.exit_code == 2 and result.output.strip() == message


def test_launch_binds_localhost_without_share_and_passes_auth(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(ui_app, "warm_up", lambda slots: None)  # no model load in this test
    ui_app.launch(UIConfig(auth="alice:s3cret", runs_dir=tmp_path))
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False
    assert seen["auth"] == ("alice", "s3cret") and seen["allowed_paths"] == [str(tmp_path.resolve())]


def test_building_the_app_loads_no_model(make_slots, tmp_path):
    slots = make_slots()
    demo = create_app(UIConfig(votes=tmp_path / "v.jsonl", runs_dir=tmp_path), slots)
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"chat-input", "compare-input", "vote-left", "runs-pick", "model-status"} <= ids
    assert not slots["policy"].loaded and not slots["reference"].loaded


def test_the_backend_dropdown_offers_real_backends_but_not_the_test_only_mock(make_slots, tmp_path):
    demo = create_app(UIConfig(votes=tmp_path / "v.jsonl", runs_dir=tmp_path), make_slots())
    dropdowns = [b for b in demo.blocks.values() if type(b).__name__ == "Dropdown" and b.label in ("policy backend", "reference backend")]
    assert len(dropdowns) == 2  # policy and reference
    for dropdown in dropdowns:
        offered = {choice[0] if isinstance(choice, tuple) else choice for choice in dropdown.choices}
        assert {"auto", "transformers", "llama.cpp", "vllm"} <= offered
        assert "mock" not in offered


def test_a_page_load_fills_the_model_boxes_with_what_the_slots_hold_now(make_slots, tmp_path):
    """After a reload the boxes show the models loaded now, not the launch defaults: Load then swaps nothing by surprise."""
    slots = make_slots()
    demo = create_app(UIConfig(policy="pol", reference="ref", votes=tmp_path / "v.jsonl", runs_dir=tmp_path), slots)
    slots["policy"].load("ref", "llama.cpp")  # after launch, say from another tab
    shown = {}
    for fn in demo.fns.values():  # the page-load events that fill the Models panel
        if any(event == "load" for _, event in fn.targets) and any(b.elem_id in ("model-policy", "model-status") for b in fn.outputs):
            values = fn.fn()
            values = values if len(fn.outputs) > 1 else [values]
            shown.update({block.elem_id: value for block, value in zip(fn.outputs, values, strict=True)})
    assert (shown["model-policy"], shown["model-policy-backend"]) == ("ref", "llama.cpp")
    assert (shown["model-reference"], shown["model-reference-backend"]) == ("ref", "auto")
    assert "**policy**: `ref` loaded" in shown["model-status"]
