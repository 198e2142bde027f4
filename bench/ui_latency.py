"""Click-to-first-token in ``tandem ui``, measured in real headless Chromium as a user sees it.

Starts ``tandem ui`` as a new user does (no model flags: the shipped demo adapter on the built-in
SmolLM2 against the same base with the adapter off, both on llama.cpp by default), opens the page and
times, from the click:

- **Chat**: the first answer text on screen, then the finished answer;
- **Compare**: the first token in each pane, then both answers and the divergence view done.

Each is repeated ``--repeats`` times (a new conversation each time) and the median is printed beside
the start-up time (app up, both models loaded). Needs Debian's chromium and the playwright package
(``scripts/setup.sh --dev``). Usage: ``.venv/bin/python bench/ui_latency.py [--repeats 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
QUESTION = "What is the capital of France? Answer in one short sentence."
POLL_MS = 10


def start_ui(work: Path, threads: int | None) -> tuple[subprocess.Popen[bytes], str, float, float]:
    """``tandem ui`` with its defaults in ``work``; returns (process, url, start time, seconds until it answered)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "tandemlm.cli.main", "ui", "--port", str(port), "--votes", str(work / "votes.jsonl")]
    if threads:
        command += ["--n-threads", str(threads)]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(work / "ui.log").open("wb"), env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    while time.monotonic() - started < 300:
        if process.poll() is not None:
            sys.exit(f"tandem ui exited with {process.returncode}: {(work / 'ui.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url, started, time.monotonic() - started
        except OSError:
            time.sleep(0.2)
    process.kill()
    sys.exit("tandem ui did not answer within 300 s")


def wait(page: Any, condition: str, timeout_s: float = 300) -> float:
    """Waits for the JS ``condition``; returns the monotonic time it held."""
    page.wait_for_function(condition, polling=POLL_MS, timeout=timeout_s * 1000)
    return time.monotonic()


def bot_texts(selector: str) -> str:
    """JS: the innerText of the last bot message under ``selector`` ('' when none)."""
    return f"(Array.from(document.querySelectorAll('{selector} [data-testid=bot]')).pop()?.innerText.trim() || '')"


def bot_count(selector: str) -> str:
    return f"document.querySelectorAll('{selector} [data-testid=bot]').length"


def time_chat(page: Any) -> tuple[float, float]:
    """(click to first answer text, click to finished) for one chat turn, in seconds."""
    page.click("#chat-clear")
    page.wait_for_function(f"{bot_count('#chat-bot')} === 0")
    page.fill("#chat-input textarea", QUESTION)
    clicked = time.monotonic()
    page.click("#chat-send")
    first = wait(page, f"{bot_texts('#chat-bot')}.length > 0")
    done = wait(page, "document.querySelector('#chat-stats').innerText.includes('finished')")
    return first - clicked, done - clicked


def time_compare(page: Any) -> tuple[float, float, float]:
    """(first token left, first token right, both answers and divergence done) for one comparison, in seconds."""
    page.click("#compare-clear")
    page.wait_for_function(f"{bot_count('#compare-left-bot')} === 0")
    page.fill("#compare-input textarea", QUESTION)
    clicked = time.monotonic()
    page.click("#compare-run")
    sides = {}
    for side in ("left", "right"):
        sides[side] = wait(page, f"{bot_texts(f'#compare-{side}-bot')}.length > 0")
    done = wait(page, "document.querySelector('#compare-status').innerText.includes('vote below')")
    return sides["left"] - clicked, sides["right"] - clicked, done - clicked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the app's)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tandem-ui-bench-") as tmp:
        work = Path(tmp)
        process, url, started, up = start_ui(work, args.threads)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(300_000)
                page.goto(url)
                loaded = wait(page, "document.querySelector('#model-status')?.innerText.includes('reference: smollm2 loaded')"
                              " && document.querySelector('#model-status')?.innerText.includes('policy: demo:ppo-capitals loaded')")
                ready = loaded - started
                chats = [time_chat(page) for _ in range(args.repeats)]
                page.get_by_role("tab", name="Compare").click()
                compares = [time_compare(page) for _ in range(args.repeats)]
                browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    report(up, ready, chats, compares)


def report(up: float, ready: float, chats: list[tuple[float, float]], compares: list[tuple[float, float, float]]) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"

    print(f"app answering: {up:.1f} s after start; both models loaded: {ready:.1f} s after start")
    print(f"chat    click -> first token   {med([c[0] for c in chats])}")
    print(f"chat    click -> finished      {med([c[1] for c in chats])}")
    print(f"compare click -> first token   policy {med([c[0] for c in compares])}; reference {med([c[1] for c in compares])}")
    print(f"compare click -> both done + divergence  {med([c[2] for c in compares])}")
    print(f"({len(chats)} chat turns and {len(compares)} comparisons; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
