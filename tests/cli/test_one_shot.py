"""`tandem generate` says why it printed nothing; `tandem chat MODEL "question"` answers once and exits."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import tandemlm.cli.main as cli_main
from tandemlm.deploy.mock_engine import MockEngine

runner = CliRunner()


@pytest.fixture
def reply(monkeypatch):
    """Every model loads as a mock engine answering ``replies[0]``."""
    replies = ["Paris."]
    monkeypatch.setattr(cli_main, "_load", lambda model, options, **_: MockEngine(model_id=model, reply=replies[0]))
    return replies


def test_generate_that_ends_at_once_says_why_on_stderr(reply):
    reply[0] = ""
    result = runner.invoke(cli_main.app, ["generate", "smollm2", "What is the capital of France?"])
    assert result.exit_code == 0 and result.stdout.strip() == ""
    assert "(no text: finished (stop) after 0 tokens; an instruct model may end a raw completion at once: " in result.stderr
    assert 'try tandem chat smollm2 "What is the capital of France?"' in result.stderr


def test_generate_with_text_adds_nothing_on_stderr(reply):
    result = runner.invoke(cli_main.app, ["generate", "smollm2", "hi"])
    assert result.stdout.strip() == "Paris." and "no text" not in result.stderr


def test_chat_with_a_question_answers_once_and_exits(reply):
    result = runner.invoke(cli_main.app, ["chat", "smollm2", "What is the capital of France?"], input="never read\n")
    assert result.exit_code == 0 and result.stdout.strip() == "Paris."


def test_chat_knows_help_and_names_the_commands(reply):
    result = runner.invoke(cli_main.app, ["chat", "smollm2"], input="/help\n/frobnicate\nhello\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("/reset (forget the conversation)") >= 3  # banner, /help, the unknown command's hint
    assert "unknown command /frobnicate" in result.output and "unknown command /help" not in result.output
