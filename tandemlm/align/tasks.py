"""Verifiable tasks: prompts whose answers a rule can check.

The checkers are the GRPO verifier reward and the task accuracy of ``tandem align eval``. A prompt
row names its checker in a ``task`` column and carries the ``answer`` (alternatives separated by
``|``). Checkers register by name; an unknown name fails with the list of known ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Checker = Callable[[str, str], bool]
DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # package data: tandemlm/data/


@dataclass(frozen=True)
class Task:
    name: str
    check: Checker
    """``check(response_text, answer) -> correct``."""
    description: str


TASKS: dict[str, Task] = {}


def register_task(name: str, description: str) -> Callable[[Checker], Checker]:
    """Decorator for a task's checker."""

    def wrap(check: Checker) -> Checker:
        TASKS[name] = Task(name, check, description)
        return check

    return wrap


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name lists the known ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def verify(task: str, response: str, answer: str) -> bool:
    """Whether ``response`` solves the ``task`` prompt whose reference answer is ``answer``."""
    return get_task(task).check(response, answer)


# ---------------------------------------------------------------------------------------------
# Capitals: knowledge the built-in model half has, so sampling shows both right and wrong answers.

MAX_CAPITAL_WORDS = 30  # longer replies fail: rambling past the answer is not an answer


@functools.cache
def capitals() -> dict[str, tuple[str, ...]]:
    """Country -> accepted spellings of its capital, from the package's ``data/capitals.tsv``."""
    text = (DATA_DIR / "capitals.tsv").read_text(encoding="utf-8")
    table: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            country, names = line.split("\t")
            table[country] = tuple(names.split("|"))
    return table


@functools.cache
def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)


def _mentions(text: str, name: str) -> bool:
    return bool(_name_pattern(name).search(text))


@register_task("capital", f"names the capital (any listed spelling), no other capital, in at most {MAX_CAPITAL_WORDS} words")
def check_capital(response: str, answer: str) -> bool:
    accepted = answer.split("|")
    if len(response.split()) > MAX_CAPITAL_WORDS or not any(_mentions(response, name) for name in accepted):
        return False
    # Listing several capitals would game a "contains the answer" rule; any other capital fails.
    others = {name for names in capitals().values() for name in names} - set(accepted)
    return not any(_mentions(response, name) for name in others if not _inside_accepted(name, accepted))


def _inside_accepted(name: str, accepted: list[str]) -> bool:
    """``Washington`` is part of ``Washington, D.C.``: not another capital when that one is accepted."""
    return any(_mentions(a, name) for a in accepted)


# ---------------------------------------------------------------------------------------------
# Arithmetic: exact answers, for models that can add (the 1.5B-7B GPU recipes).

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@register_task("arithmetic", "the last number in the reply equals the answer")
def check_arithmetic(response: str, answer: str) -> bool:
    numbers = _NUMBER.findall(response)
    if not numbers:
        return False
    try:
        return float(numbers[-1].replace(",", "")) == float(answer)
    except ValueError:
        return False
