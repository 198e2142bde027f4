"""End to end in real headless Chromium: ``tandem ui`` as a user starts it, driven through the page.

Chat runs the built-in model; Compare puts it against the tiny random Llama (same tokenizer, so
the divergence view has real colour). The walk-through starts ``tandem ui`` with no model flags, as a
new user does: the shipped demo adapter against its base, a blind battle, votes, the leaderboard,
"Train DPO on these votes" and the new run as the policy, with a screenshot of each step in
``$TANDEM_TEST_ARTIFACTS`` (else pytest's tmp folder). Needs Debian's ``chromium`` (``scripts/setup.sh
--dev`` installs it) and the ``playwright`` package; skips cleanly without them. No browser is downloaded.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def _tandem_ui(work: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    """Runs ``tandem ui FLAGS`` (votes and runs in ``work``) until the block ends; yields (url, votes file)."""
    votes, runs, log = work / "votes.jsonl", work / "runs", work / "tandem-ui.log"
    port = _free_port()
    command = [
        sys.executable, "-m", "tandemlm.cli.main", "ui", "--port", str(port), *flags,
        "--votes", str(votes), "--runs-dir", str(runs),
    ]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log)
        yield url, votes
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_gguf: Path) -> Iterator[tuple[str, Path, Path]]:
    """Starts ``tandem ui`` (smollm2 policy, tiny Llama reference); yields (url, votes file, work dir)."""
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("ui")
    _write_run(work / "runs")
    with _tandem_ui(work, "--policy", "smollm2", "--reference", str(tiny_llama_gguf)) as (url, votes):
        yield url, votes, work


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium (a playwright persistent context) for the module's pages."""
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _open(browser: Any, url: str) -> Any:
    page = browser.new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    page.wait_for_selector("#chat-input textarea")
    return page


@pytest.fixture(scope="module")
def page(ui_server: tuple[str, Path, Path], browser: Any) -> Iterator[Any]:
    page = _open(browser, ui_server[0])
    try:
        yield page
    finally:
        page.close()


def _wait_for_text(page, selector: str, text: str, timeout_s: float | None = None) -> None:
    """Waits until ``selector`` shows ``text``; on timeout the failure says what it showed instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    query = f"document.querySelector({json.dumps(selector)})"
    wait = {} if timeout_s is None else {"timeout": timeout_s * 1000}
    try:
        page.wait_for_function(f"{query} && {query}.innerText.includes({json.dumps(text)})", **wait)
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


# ---------------------------------------------------------------------------------------------
# The walk-through: `tandem ui` with no model flags, from the first screen to a run trained on the votes.

BATTLE_PROMPTS = ("What is the capital of France?", "Name the capital city of Japan.")  # two votes: two DPO pairs


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """``tandem ui`` as a new user starts it (no model flags); yields (url, votes file, work dir)."""
    pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install -e '.[dev]')")
    work = tmp_path_factory.mktemp("demo-ui")
    with _tandem_ui(work) as (url, votes):
        yield url, votes, work


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the walk-through's screenshots go: ``$TANDEM_TEST_ARTIFACTS``, else a pytest tmp folder."""
    named = os.environ.get("TANDEM_TEST_ARTIFACTS")
    folder = Path(named).expanduser() if named else tmp_path_factory.mktemp("walkthrough-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(page: Any, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def _open_accordion(page: Any, label: str) -> None:
    page.locator(".label-wrap", has_text=label).first.click()


def _blind_battle_and_vote(page: Any, prompt: str, shots: Path, first: bool) -> None:
    """One blind battle: names and divergence hidden until the vote, shown after it."""
    page.fill("#compare-input textarea", prompt)
    page.click("#compare-run")
    # Set when the battle ends (the previous battle's divergence was revealed, and its status said "vote below").
    _wait_for_text(page, "#compare-left-divergence", "hidden until you vote")
    _wait_for_text(page, "#compare-status", "vote below")
    stats = page.inner_text("#compare-left-stats") + page.inner_text("#compare-right-stats")
    assert "model A" in stats and "model B" in stats, stats
    assert "demo:ppo-capitals" not in stats and "smollm2" not in stats, stats  # names hidden
    if first:
        _shot(page, shots, "02-blind-battle")
    page.click("#vote-left")
    _wait_for_text(page, "#vote-status", "Recorded left")
    revealed = page.inner_text("#vote-status")
    assert "demo:ppo-capitals" in revealed and "smollm2" in revealed, revealed
    _wait_for_text(page, "#compare-left-divergence", "Σ log π/π_ref")  # shown once voted
    if first:
        _shot(page, shots, "03-voted-names-revealed")


@pytest.mark.timeout(1800)
def test_walkthrough_demo_adapter_to_a_run_trained_on_blind_votes(browser, demo_server, shots):
    url, votes, _work = demo_server
    page = _open(browser, url)
    try:
        # 1. The first screen: the shipped PPO adapter on smollm2 as the policy, the same base (adapter off) as the reference.
        _wait_for_text(page, "#model-status", "policy: demo:ppo-capitals loaded (LoRA on smollm2")
        _wait_for_text(page, "#model-status", "reference: smollm2 loaded")
        assert page.input_value("#model-policy textarea") == "demo:ppo-capitals"
        assert page.input_value("#model-reference textarea") == "smollm2"
        _shot(page, shots, "01-first-screen")

        # 2-3. Blind battles in Compare, one vote each (each left/right vote is a DPO pair).
        page.get_by_role("tab", name="Compare").click()
        assert "same model" not in page.inner_text("#compare-same-model")
        page.get_by_text("system prompt and sampling").click()
        _set_number(page, "#compare-max-tokens", 16)
        page.locator("#compare-blind input").check()
        for i, prompt in enumerate(BATTLE_PROMPTS):
            _blind_battle_and_vote(page, prompt, shots, first=i == 0)
        records = [json.loads(line) for line in votes.read_text().splitlines()]
        assert len(records) == 2 and all(r["label"] == "left" for r in records)
        assert all({r["chosen_model"], r["rejected_model"]} == {"demo:ppo-capitals", "smollm2"} for r in records)
        _wait_for_text(page, "#vote-file-info", "2 usable DPO pairs")

        # 4. The leaderboard counts both battles between the two models.
        _open_accordion(page, "Leaderboard (from the votes file)")
        _wait_for_text(page, "#leaderboard-note", "2 battles")
        board = page.inner_text("#leaderboard")
        assert "demo:ppo-capitals" in board and "smollm2" in board, board
        _shot(page, shots, "04-leaderboard")

        # 5. Train DPO on these votes: 2 steps on the policy's base.
        _open_accordion(page, "Train DPO on these votes")
        assert page.input_value("#train-model textarea") == "smollm2"  # the demo run's base, not the run itself
        steps = page.locator("#train-steps input")
        steps.fill("2")
        steps.press("Tab")
        page.click("#train-start")
        _wait_for_text(page, "#train-status", "votes-dpo-")  # the progress bar (or, on a fast machine, already done)
        _shot(page, shots, "05-training")
        _wait_for_text(page, "#train-status", "✓ Trained", timeout_s=900)
        assert "(2 steps" in page.inner_text("#train-status"), page.inner_text("#train-status")
        _shot(page, shots, "06-trained")

        # 6. The new run loads as the policy (LoRA on smollm2) against its base, and the Runs tab lists it.
        page.click("#train-load")
        page.wait_for_function("document.querySelector('#model-policy textarea').value.includes('votes-dpo-')")
        policy = page.input_value("#model-policy textarea")
        assert "votes-dpo-" in policy and (Path(policy) / "final" / "adapter_config.json").is_file(), policy
        _wait_for_text(page, "#model-status", f"policy: {policy} loaded (LoRA on smollm2")
        assert page.input_value("#model-reference textarea") == "smollm2"
        _shot(page, shots, "07-new-run-as-policy")
        page.get_by_role("tab", name="Runs").click()
        page.get_by_role("button", name="Refresh", exact=True).click()
        page.locator("#runs-pick input").click()
        page.get_by_role("option", name=Path(policy).name).click()
        _wait_for_text(page, "#runs-status", "policy: LoRA adapter")
        _shot(page, shots, "08-runs-tab")
    finally:
        page.close()
