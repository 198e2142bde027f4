"""Terminal chat: streams replies, keeps the conversation, and takes a few slash commands."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from tandemlm.cli.options import utf8_problem
from tandemlm.deploy.engine import Engine
from tandemlm.deploy.types import Delta, SamplingParams, Usage
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /help, /exit; Ctrl-C stops an answer"


def stream_to_terminal(stream: Iterator[Delta], console: Console | None = None) -> tuple[str, Usage | None]:
    """Prints reasoning (dimmed) and answer as they stream; returns the answer text and usage."""
    out = sys.stdout
    answer: list[str] = []
    usage = None
    in_reasoning = False
    for delta in stream:
        if delta.reasoning:
            if not in_reasoning:
                out.write("\x1b[2m[thinking] " if out.isatty() else "[thinking] ")
                in_reasoning = True
            out.write(delta.reasoning)
        if delta.text:
            if in_reasoning:
                out.write("\x1b[0m\n" if out.isatty() else "\n")
                in_reasoning = False
            out.write(delta.text)
            answer.append(delta.text)
        out.flush()
        usage = delta.usage or usage
    if in_reasoning and out.isatty():
        out.write("\x1b[0m")
    out.write("\n")
    out.flush()
    return "".join(answer), usage


def tracked(stream: Iterator[Delta], seen: dict[str, Any]) -> Iterator[Delta]:
    """Passes ``stream`` through, keeping its finish reason and usage in ``seen``."""
    for delta in stream:
        if delta.finish_reason:
            seen["finish"] = delta.finish_reason
        if delta.usage:
            seen["tokens"] = delta.usage.completion_tokens
        yield delta


def explain_empty(text: str, seen: dict[str, Any], model: str, prompt: str, chat: bool) -> None:
    """Says on stderr why nothing was printed: finish reason and token count, and the chat alternative."""
    if text.strip():
        return
    tokens, finish = seen.get("tokens", 0), seen.get("finish", "stop")
    hint = "" if chat else f'; an instruct model may end a raw completion at once: try tandem chat {model} "{prompt}"'
    print(f"(no text: finished ({finish}) after {tokens} tokens{hint})", file=sys.stderr)


def chat_loop(engine: Engine, params: SamplingParams, system: str | None = None) -> None:
    """Reads user turns from stdin until EOF or /exit; a line that is not UTF-8 is refused in one line."""
    console = Console(stderr=True)
    if reconfigure := getattr(sys.stdin, "reconfigure", None):
        reconfigure(errors="surrogateescape")  # bad bytes arrive as lone surrogates, not a UnicodeDecodeError
    interactive = sys.stdin.isatty()
    console.print(f"[bold]{engine.info.model_id}[/] via {engine.info.backend}. {HELP}")
    history: list[Message] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if not text:
            continue
        if problem := utf8_problem(text, "that line"):
            console.print(f"[yellow]{problem}; skipped[/]")
            continue
        if text in ("/exit", "/quit"):
            break
        if text in ("/help", "/?"):
            console.print(HELP)
            continue
        if text == "/reset":
            history = []
            console.print("[dim]conversation cleared[/]")
            continue
        if text.startswith("/system"):
            system = text.removeprefix("/system").strip() or None
            history = []
            console.print(f"[dim]system prompt {'set' if system else 'cleared'}; conversation cleared[/]")
            continue
        if text.startswith("/"):
            console.print(f"[yellow]unknown command {text.split()[0]}[/]; {HELP}")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": text}]
        started = time.perf_counter()
        try:
            answer, usage = stream_to_terminal(engine.chat(messages, params))
        except EngineError as exc:
            console.print(f"[red]error:[/] {exc}")
            continue
        except KeyboardInterrupt:
            print(flush=True)  # the partial answer (and the terminal's ^C) ends its line first
            console.print("[dim]stopped[/]")
            continue
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        if usage:
            seconds = time.perf_counter() - started
            console.print(f"[dim]{usage.completion_tokens} tokens, {usage.completion_tokens / max(seconds, 1e-9):.1f} tokens/s[/]")
