"""End to end in real headless Chromium: ``tandem ui`` as a user starts it, driven through the page.

Chat runs the built-in model; Compare puts it against the tiny random Llama (same tokenizer, so
the divergence view has real colour). Needs Debian's ``chromium`` (``scripts/setup.sh --dev``
installs it) and the ``playwright`` package; skips cleanly without them. No browser is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WATCH_ANSWER_LENGTHS = """() => {
  window.answerLengths = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat-bot [data-testid=bot]');
    if (bots.length) window.answerLengths.push(bots[bots.length - 1].innerText.trim().length);
  }).observe(document.querySelector('#chat-bot'), {childList: true, subtree: true, characterData: true});
}"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (setup.sh --dev)"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"tandem ui exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"tandem ui did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _write_run(runs: Path) -> None:
    """A finished-looking alignment run with metrics and one plot."""
    from PIL import Image, ImageDraw

    run = runs / "dpo-demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: dpo\nbeta: 0.1\n")
    losses = [0.69, 0.61, 0.52, 0.47, 0.41]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))
    image = Image.new("RGB", (320, 160), "white")
    ImageDraw.Draw(image).line([(20 + 70 * i, 150 - 200 * (v - 0.35)) for i, v in enumerate(losses)], fill="blue", width=3)
    image.save(run / "loss.png")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_gguf: Path) -> Iterator[tuple[str, Path, Path]]:
    """Starts ``tandem ui`` (smollm2 policy, tiny Llama reference); yields (url, votes file, work dir)."""
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("ui")
    votes, runs, log = work / "votes.jsonl", work / "runs", work / "tandem-ui.log"
    _write_run(runs)
    port = _free_port()
    command = [
        sys.executable, "-m", "tandemlm.cli.main", "ui", "--port", str(port), "--reference", str(tiny_llama_gguf),
        "--votes", str(votes), "--runs-dir", str(runs),
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log)
        yield url, votes, work
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def page(ui_server: tuple[str, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(ui_server[0])
        page.wait_for_selector("#chat-input textarea")
        try:
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _wait_for_text(page, selector: str, text: str) -> None:
    """Waits until ``selector`` shows ``text``; on timeout the failure says what it showed instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    query = f"document.querySelector({json.dumps(selector)})"
    try:
        page.wait_for_function(f"{query} && {query}.innerText.includes({json.dumps(text)})")
    except PlaywrightTimeout:
        shown = {s: page.evaluate("s => document.querySelector(s)?.innerText", s) for s in (selector, "#model-status")}
        pytest.fail(f"{selector} never showed {text!r}; the page shows {shown}")


def _set_number(page, selector: str, value: int) -> None:
    """Types ``value`` into a slider's number box and waits until the slider itself has taken it.

    Right after a stopped chat the number box sometimes drops the first edit (seen in about one run in
    three, cause not found yet: a Gradio front-end race is suspected), so the edit is made up to three times.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"{selector} input[type=number]")
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        try:
            page.wait_for_function(f"document.querySelector('{selector} input[type=range]').value === '{value}'", timeout=20_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def test_chat_streams_an_answer_from_the_builtin_model(page, ui_server):
    _wait_for_text(page, "#model-status", "policy: smollm2 loaded")
    _set_number(page, "#chat-max-tokens", 48)
    # Record every length the answer passes through, as the page renders it.
    page.evaluate(WATCH_ANSWER_LENGTHS)
    page.fill("#chat-input textarea", "Write a short poem about the sea.")
    page.click("#chat-send")
    _wait_for_text(page, "#chat-stats", "finished")
    stats = page.inner_text("#chat-stats")
    answer = page.locator("#chat-bot [data-testid=bot]").last.inner_text().strip()
    lengths = page.evaluate("window.answerLengths")
    assert "tokens/s" in stats and "first token" in stats
    assert len(answer) > 10
    partial = [n for n in lengths if 0 < n < len(answer)]
    assert len(set(partial)) >= 2, f"answer lengths seen {lengths}: it did not stream"
    page.screenshot(path=str(ui_server[2] / "chat.png"), full_page=True)

    # Stop: the answer stops growing and says so; the conversation goes on.
    _set_number(page, "#chat-max-tokens", 512)
    page.fill("#chat-input textarea", "Tell me a long story about a dragon.")
    page.click("#chat-send")
    page.wait_for_function("document.querySelectorAll('#chat-bot [data-testid=bot]').length == 2")
    page.click("#chat-stop")
    _wait_for_text(page, "#chat-stats", "· stopped")
    stopped = page.locator("#chat-bot [data-testid=bot]").last.inner_text()
    time.sleep(1)
    assert page.locator("#chat-bot [data-testid=bot]").last.inner_text() == stopped


def test_compare_shows_both_answers_their_divergence_and_records_a_vote(page, ui_server):
    _, votes, work = ui_server
    page.get_by_role("tab", name="Compare").click()
    page.get_by_text("system prompt and sampling").click()
    _set_number(page, "#compare-max-tokens", 24)
    page.fill("#compare-input textarea", "Name a colour.")
    page.click("#compare-run")
    _wait_for_text(page, "#compare-status", "vote below")
    assert page.locator("#compare-left-bot [data-testid=bot]").last.inner_text().strip()
    assert page.locator("#compare-right-bot [data-testid=bot]").last.inner_text().strip()
    assert "smollm2" in page.inner_text("#compare-left-stats")
    divergence = page.inner_text("#compare-left-divergence")
    assert "Σ log π/π_ref" in divergence and "+0.000" not in divergence  # two different models differ
    assert page.locator("#compare-left-divergence span[title^='log π/π_ref']").count() > 0

    page.click("#vote-left")
    _wait_for_text(page, "#vote-status", "Recorded")
    [record] = [json.loads(line) for line in votes.read_text().splitlines()]
    assert record["label"] == "left" and record["prompt"] == [{"role": "user", "content": "Name a colour."}]
    assert record["chosen"][0]["content"] and record["chosen_model"] == "smollm2"
    assert record["rejected_model"].endswith(".gguf") and record["sampling"]["max_tokens"] == 24

    page.click("#vote-export")
    _wait_for_text(page, "#vote-status", "1 records exported")
    screenshot = work / "compare.png"  # kept in pytest's tmp folder (the last runs are kept) for a look
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_runs_tab_lists_the_run_with_its_plot(page):
    page.get_by_role("tab", name="Runs").click()
    page.locator("#runs-pick input").click()
    page.get_by_role("option", name="dpo-demo").click()
    _wait_for_text(page, "#runs-status", "5 logged steps, 1 plots")
    assert page.locator("#runs-plots img").count() == 1


def test_bad_input_is_shown_in_the_page_and_the_app_stays_up(page):
    page.get_by_role("tab", name="Chat").click()
    page.fill("#chat-input textarea", "   ")
    page.click("#chat-send")
    _wait_for_text(page, "#chat-stats", "Type a message first.")
    page.fill("#model-reference textarea", "/no/such/model.gguf")
    page.click("#model-reference-load")
    _wait_for_text(page, "#model-status", "⚠ model path /no/such/model.gguf does not exist")
    assert "policy: smollm2 loaded" in page.inner_text("#model-status")
