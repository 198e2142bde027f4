"""Prompt-processing and generation speed of a GGUF, measured by llama.cpp's own ``llama-bench``.

Every row of a report (and of a ladder of quant types) is measured the same way: ``llama-bench -m
FILE -p 512 -n 128 -t THREADS -r REPETITIONS -o json``, built from the llama.cpp source that the
installed llama-cpp-python vendors (``tandemlm.llamacpp.programs``). Its JSON is a list of tests, one per
``-p``/``-n`` value: the prompt test has ``n_prompt`` 512 and ``n_gen`` 0, the generation test
``n_prompt`` 0 and ``n_gen`` 128; ``avg_ts`` is the mean tokens per second over the repetitions.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tandemlm.errors import QuantizeError

PROMPT_TOKENS = 512  # pp512
GEN_TOKENS = 128  # tg128
TIMEOUT_S = 3600  # a 70B on CPU takes minutes per repetition; a hang should still end


@dataclass(frozen=True)
class Speed:
    """llama-bench's averages in tokens per second."""

    pp_tok_s: float  # prompt processing, 512 tokens in one batch
    tg_tok_s: float  # generation, 128 tokens one at a time


def bench_command(binary: Path, model: Path, threads: int, repetitions: int) -> list[str]:
    """The llama-bench command line for ``model`` (pp512 and tg128, JSON on stdout)."""
    return [
        str(binary), "-m", str(model), "-p", str(PROMPT_TOKENS), "-n", str(GEN_TOKENS),
        "-t", str(threads), "-r", str(repetitions), "-o", "json",
    ]


def parse_bench_json(text: str) -> Speed:
    """pp512 and tg128 ``avg_ts`` from llama-bench's ``-o json`` output; a one-line error if either is missing."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantizeError(f"llama-bench printed no JSON ({exc.msg}): {text.strip()[:200]!r}") from None
    found: dict[str, float] = {}
    for test in tests if isinstance(tests, list) else []:
        if not isinstance(test, dict) or not isinstance(test.get("avg_ts"), (int, float)):
            continue
        if (test.get("n_prompt"), test.get("n_gen")) == (PROMPT_TOKENS, 0):
            found["pp"] = float(test["avg_ts"])
        elif (test.get("n_prompt"), test.get("n_gen")) == (0, GEN_TOKENS):
            found["tg"] = float(test["avg_ts"])
    if set(found) != {"pp", "tg"}:
        missing = [name for name, key in (("pp512", "pp"), ("tg128", "tg")) if key not in found]
        raise QuantizeError(f"llama-bench's JSON has no {' or '.join(missing)} result with avg_ts")
    return Speed(pp_tok_s=found["pp"], tg_tok_s=found["tg"])


def measure_speed(model: str | Path, threads: int, repetitions: int) -> Speed:
    """Runs llama-bench on ``model`` (built on first use: minutes, once) and returns its speeds."""
    from tandemlm.llamacpp.programs import llamacpp_binary

    command = bench_command(llamacpp_binary("llama-bench"), Path(model), threads, repetitions)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise QuantizeError(f"llama-bench on {model} took more than {TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise QuantizeError(f"llama-bench failed on {model} (exit {done.returncode}): {tail}")
    return parse_bench_json(done.stdout)
