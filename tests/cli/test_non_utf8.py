"""Bytes that are not UTF-8, on argv or stdin, are one line each; a chat session goes on after one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tandemlm.cli.main import app

runner = CliRunner()
BAD_LINES = b"\xff\xfe hello\n" + b'{"prompt": "caf\xc3\n'  # latin-1 noise; a character cut after its first byte


def tandem(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``tandem ARGS`` in a real process (argv bytes decoded by Python, a real stdin), output as bytes.

    Its stdin decodes strictly, as under a user's en_US.UTF-8 locale (Python's C and C.UTF-8
    locales, the default here, would surrogate-escape bad bytes on their own).
    """
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    return subprocess.run(
        [sys.executable, "-m", "tandemlm.cli.main", *args], input=stdin, capture_output=True, timeout=300, env=env
    )


@pytest.fixture
def mock_engine(monkeypatch):
    """``tandem chat``/``generate`` load the mock engine, which answers the reversed user message."""
    import tandemlm.cli.main as cli_main
    from tandemlm.deploy.mock_engine import MockEngine

    monkeypatch.setattr(cli_main, "_load", lambda model, options, **extra: MockEngine(model_id=model))


def test_generate_refuses_a_prompt_argument_that_is_not_utf8():
    result = tandem("generate", "smollm2", b"caf\xe9 au lait")  # latin-1 é; Python surrogate-escapes it
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert stderr.strip().splitlines() == ["error: PROMPT is not valid UTF-8 (byte 0xe9 at character 4)"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "smollm2", "hi", "--stop", "\udcff"],
            "error: --stop is not valid UTF-8 (byte 0xff at character 1)",
        ),
        (["chat", "smollm2", "--system", "be \udce9"], "error: --system is not valid UTF-8 (byte 0xe9 at character 4)"),
    ],
)
def test_flags_that_are_not_utf8_are_one_line_errors(mock_engine, args, message):
    result = runner.invoke(app, args)
    assert (result.exit_code, result.output.strip()) == (2, message)


def test_chat_skips_lines_that_are_not_utf8_and_goes_on(mock_engine):
    result = runner.invoke(app, ["chat", "smollm2"], input=b"hello\n" + BAD_LINES + b"world\n")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.output.count("that line is not valid UTF-8") == 2
    assert "byte 0xff at character 1" in result.output and "byte 0xc3 at character 16" in result.output
    assert "olleh" in result.output and "dlrow" in result.output  # the turns before and after were answered


@pytest.mark.slow
def test_chat_on_a_real_stdin_survives_bytes_that_are_not_utf8():
    stdin = b"Say hi.\n" + BAD_LINES + b"What is 2+2?\n"
    result = tandem("chat", "smollm2", "--temperature", "0", "--max-tokens", "4", stdin=stdin)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if "not valid UTF-8" in line]
    assert len(warnings) == 2 and all(line.startswith("that line is not valid UTF-8") for line in warnings)
    assert stderr.count("tokens/s") == 2  # both good turns were answered
