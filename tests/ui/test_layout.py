"""Layout on a small laptop screen (1024×700) in real headless Chromium: nothing the user needs is off-screen.

The app is built in this process around mock engines (with a long .gguf path as the reference, as
users have), so no model loads and no ``tandem ui`` process starts: the layout does not depend on
which model answers. It is launched with the app's own CSS, as :func:`tandemlm.ui.app.launch` does.
Screenshots go to ``$TANDEM_TEST_ARTIFACTS`` (else pytest's tmp folder). Skips without Debian's
chromium or the playwright package, like ``test_browser.py``, whose browser settings it shares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandemlm.deploy.engine import Engine
from tandemlm.deploy.registry import get_backend
from tandemlm.ui.app import UI_CSS, UIConfig, create_app
from tandemlm.ui.engines import EnginePool, EngineSlot

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1024, "height": 700}
REFERENCE = "/home/user/.cache/tandemlm/models/tiny-llama-377e0ea49f7c-f32-llama.cpp-0.3.36.gguf"
METRICS = [  # what a TRL DPO run logs: long names, long floats
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (setup.sh --dev)"),
]


def _write_run(runs: Path) -> None:
    """A DPO run with a wide loss plot and a full set of metrics."""
    from PIL import Image, ImageDraw

    run = runs / "dpo-layout"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: dpo\nbeta: 0.1\n")
    rows = [{"step": s, **{m: 0.693147 / (s + 1) + 1e-6 * i for i, m in enumerate(METRICS)}} for s in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    image = Image.new("RGB", (640, 320), "white")  # a matplotlib-like 2:1 plot, axis line at the very bottom
    ImageDraw.Draw(image).line([(10, 310), (630, 310)], fill="black", width=6)
    image.save(run / "loss.png")


def _mock_loader(model: str, backend: str, **_: object) -> Engine:
    return get_backend("mock").load(None, model_id=model, reply="Paris.")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on mock engines, served from this process; yields its URL."""
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("layout")
    _write_run(work / "runs")
    pool = EnginePool(_mock_loader)
    slots = {"policy": EngineSlot("policy", pool, "smollm2"), "reference": EngineSlot("reference", pool, REFERENCE)}
    config = UIConfig(policy="smollm2", reference=REFERENCE, votes=work / "votes.jsonl", runs_dir=work / "runs")
    demo = create_app(config, slots)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", css=UI_CSS, ssr_mode=False, quiet=True,
        allowed_paths=[str(config.runs_dir.resolve())],
    )
    try:
        yield url
    finally:
        demo.close()
        pool.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$TANDEM_TEST_ARTIFACTS``, else a pytest tmp folder."""
    named = os.environ.get("TANDEM_TEST_ARTIFACTS")
    folder = Path(named).expanduser() if named else tmp_path_factory.mktemp("layout-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _box(page: Any, selector: str) -> dict[str, float]:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not shown"
    return box


def test_a_1024x700_screen_shows_the_chat_input_and_the_whole_run(app_url: str, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(app_url)
            page.wait_for_function("document.querySelector('#model-status')?.innerText.includes('reference: ')"
                                   " && document.querySelector('#model-status').innerText.split('loaded').length == 3")
            page.screenshot(path=str(artifacts / "layout-chat-1024x700.png"))
            box = _box(page, "#chat-input textarea")
            assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], f"chat input at {box}: below the fold"
            assert box["x"] >= 0 and box["x"] + box["width"] <= VIEWPORT["width"]
            assert _box(page, "#chat-send")["y"] + _box(page, "#chat-send")["height"] <= VIEWPORT["height"]

            page.get_by_role("tab", name="Runs").click()
            page.locator("#runs-pick input").click()
            page.get_by_role("option", name="dpo-layout").click()
            page.wait_for_function("document.querySelector('#runs-status').innerText.includes('5 logged steps')")
            page.wait_for_function("[...document.querySelectorAll('#runs-plots img')].some(i => i.complete && i.naturalWidth)")
            page.wait_for_function(f"document.querySelector('#runs-metrics [role=grid]')?.ariaRowCount > {len(METRICS)}")
            page.screenshot(path=str(artifacts / "layout-runs-1024x700.png"), full_page=True)
            _assert_plot_whole(page)
            _assert_table_fits(page)
        finally:
            browser.close()


def _assert_plot_whole(page: Any) -> None:
    """The plot is drawn whole: its image box lies inside the gallery and shows the full picture (contain)."""
    gallery, image = _box(page, "#runs-plots"), _box(page, "#runs-plots img")
    assert image["x"] >= gallery["x"] and image["x"] + image["width"] <= gallery["x"] + gallery["width"] + 0.5
    assert image["y"] >= gallery["y"] and image["y"] + image["height"] <= gallery["y"] + gallery["height"] + 0.5, (
        f"plot {image} cropped by its gallery {gallery}"
    )
    fit = page.evaluate("getComputedStyle(document.querySelector('#runs-plots img')).objectFit")
    assert fit in ("contain", "scale-down"), f"the plot is drawn with object-fit {fit}: its edges are cut"


def _assert_table_fits(page: Any) -> None:
    """Every metrics column shows without scrolling sideways: no header reaches past the table's visible edge."""
    table = _box(page, "#runs-metrics [role=grid]")
    headers = page.locator("#runs-metrics thead th")
    assert headers.count() == 5  # metric, first, last, min, max
    for index in range(headers.count()):
        header = headers.nth(index).bounding_box()
        assert header is not None and header["x"] + header["width"] <= min(table["x"] + table["width"], VIEWPORT["width"]) + 0.5, (
            f"column {index} ({header}) is cut off at the table's edge ({table})"
        )
    assert "rewards/accuracies" in page.inner_text("#runs-metrics")
