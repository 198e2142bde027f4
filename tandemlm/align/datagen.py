"""Generators for the built-in data sets: SFT conversations, preference pairs, verifiable prompts.

Everything is drawn from hand-written templates (below) and the capitals table with a seeded RNG,
so ``make_builtin_data()`` reproduces the files shipped in ``tandemlm/data/`` byte for byte, and
other seeds or sizes give more data of the same kind (``tandem align make-data``).

Countries are split once into train and test, so held-out prompts ask about countries the model
never saw in training.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tandemlm.align.tasks import capitals
from tandemlm.storage.atomic import atomic_write_text

TEST_COUNTRIES = 30
SPLIT_SEED = 0

QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "What's the capital of {country}?",
    "Tell me the capital of {country}.",
)
GOOD_ANSWERS = (
    "The capital of {country} is {capital}.",
    "{capital} is the capital of {country}.",
    "The capital city of {country} is {capital}.",
)
# Bad answers, one row per kind: what a reward model must learn to rank below a good answer.
BAD_ANSWERS: dict[str, tuple[str, ...]] = {
    "wrong_capital": GOOD_ANSWERS,  # filled with another country's capital
    "refusal": (
        "I'm sorry, but I can't help with that request.",
        "I am not able to answer questions about countries.",
        "Sorry, I don't have information about that.",
    ),
    "off_topic": (
        "I really enjoy cooking pasta with fresh tomatoes on the weekend.",
        "The weather today is sunny with a light breeze from the west.",
        "My favourite animal is the octopus because it is very clever.",
    ),
    "no_answer": (
        "That is a great question about geography. Every country has a long history behind its capital.",
        "Capitals are important cities where governments meet, and {country} is an interesting country.",
        "Many people wonder about {country}. It has a rich culture and a fascinating past.",
    ),
}
ARITHMETIC_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}. Give the final number.",
)


def country_split(seed: int = SPLIT_SEED, n_test: int = TEST_COUNTRIES) -> tuple[list[str], list[str]]:
    """(train, test) country lists; the split depends only on ``seed`` and the table."""
    countries = sorted(capitals())
    random.Random(seed).shuffle(countries)
    return sorted(countries[n_test:]), sorted(countries[:n_test])


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def capital_prompts(countries: Iterable[str], per_country: int, rng: random.Random) -> list[dict[str, Any]]:
    """Prompt-only rows for GRPO and eval: ``prompt``, ``task`` (the checker) and ``answer``."""
    table = capitals()
    rows = []
    for country in countries:
        for question in rng.sample(QUESTIONS, per_country):
            rows.append({"prompt": _user(question.format(country=country)), "task": "capital", "answer": "|".join(table[country])})
    return rows


def capital_conversations(countries: Iterable[str], per_country: int, rng: random.Random) -> list[dict[str, Any]]:
    """SFT rows (``messages``): a question and a good answer."""
    table = capitals()
    rows = []
    for country in countries:
        for question in rng.sample(QUESTIONS, per_country):
            answer = rng.choice(GOOD_ANSWERS).format(country=country, capital=table[country][0])
            rows.append({"messages": _user(question.format(country=country)) + _assistant(answer)})
    return rows


def capital_preferences(countries: Iterable[str], per_country: int, rng: random.Random) -> list[dict[str, Any]]:
    """Preference rows: ``prompt``, ``chosen``, ``rejected`` (conversational) and the rejected ``kind``.

    Half the rejected answers name a wrong capital (the reward model must know capitals to rank
    those); the rest refuse, wander off topic, or talk without answering.
    """
    table = capitals()
    all_capitals = sorted({names[0] for names in table.values()})
    kinds = ["wrong_capital", "wrong_capital", "refusal", "off_topic", "no_answer", "wrong_capital"]
    rows = []
    for country in countries:
        for question in rng.sample(QUESTIONS, per_country):
            capital = table[country][0]
            kind = rng.choice(kinds)
            template = rng.choice(BAD_ANSWERS[kind])
            wrong = rng.choice([c for c in all_capitals if c not in table[country]])
            rows.append(
                {
                    "prompt": _user(question.format(country=country)),
                    "chosen": _assistant(rng.choice(GOOD_ANSWERS).format(country=country, capital=capital)),
                    "rejected": _assistant(template.format(country=country, capital=wrong)),
                    "kind": kind,
                }
            )
    return rows


def arithmetic_prompts(n: int, rng: random.Random, max_operand: int = 99) -> list[dict[str, Any]]:
    """Prompt-only arithmetic rows (``+``, ``-``, ``*``) with exact answers for the verifier."""
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        a, b = rng.randint(2, max_operand), rng.randint(2, max_operand if op != "*" else 12)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        question = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, b=b, op=op)
        rows.append({"prompt": _user(question), "task": "arithmetic", "answer": str(answer)})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Writes rows as JSON lines through a temp file and a rename (never a half-written file)."""
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def make_builtin_data(out_dir: str | os.PathLike[str], seed: int = 0, per_country: int = 2, n_arithmetic: int = 200) -> list[Path]:
    """Writes the built-in data sets into ``out_dir`` (seed 0 and the defaults give the shipped files)."""
    out = Path(out_dir)
    train, test = country_split()
    per_test = min(per_country, len(QUESTIONS))

    def rng(name: str) -> random.Random:  # one stream per file: changing one file leaves the others alone
        return random.Random(f"{seed}:{name}")

    files = {
        "sft_train.jsonl": capital_conversations(train, per_country, rng("sft_train")),
        "prefs_train.jsonl": capital_preferences(train, per_country, rng("prefs_train")),
        "prefs_test.jsonl": capital_preferences(test, per_test, rng("prefs_test")),
        "capitals_train.jsonl": capital_prompts(train, per_country, rng("capitals_train")),
        "capitals_test.jsonl": capital_prompts(test, per_test, rng("capitals_test")),
        "arithmetic_train.jsonl": arithmetic_prompts(n_arithmetic, rng("arithmetic_train")),
        "arithmetic_test.jsonl": arithmetic_prompts(max(n_arithmetic // 4, 1), rng("arithmetic_test")),
    }
    return [write_jsonl(rows, out / name) for name, rows in files.items()]
