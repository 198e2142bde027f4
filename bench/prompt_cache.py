"""Second-turn time to first token after the slots were recycled: the prompt cache on and off.

    .venv/bin/python bench/prompt_cache.py [--model smollm2] [--history 1500] [--repeats 3] [--threads N]

A conversation with a long first turn (a document of ``--history`` tokens to discuss) gets its first answer;
then as many unrelated requests as the engine has sequences run at once, so no sequence holds the
conversation any more; then the second turn is sent and its TTFT (request to first token) and prefilled
prompt tokens are measured. The same on an engine with ``--cache-ram 0`` (no prompt cache: "before") and
with the default budget ("after"). In-process llama.cpp engines, one at a time, greedy decoding.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from tandemlm.deploy.engine import collect
from tandemlm.deploy.registry import load_engine
from tandemlm.deploy.types import SamplingParams
from tandemlm.hardware import physical_cores

SHORT = SamplingParams(temperature=0, max_tokens=16)


def document(engine, tokens: int) -> str:
    """About ``tokens`` tokens of plain prose."""
    sentence = "The river runs past the old mill, where the miller keeps a ledger of every sack of grain. "
    text = sentence * (tokens // len(engine.tokenize(sentence)) + 1)
    return engine.detokenize(engine.tokenize(text)[:tokens])


def recycle(engine, sequences: int) -> None:
    """``sequences`` unrelated requests at once, so every sequence is taken and its cells replaced."""
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 20}."}] for i in range(sequences)]
    threads = [threading.Thread(target=lambda m=m: collect(engine.chat(m, SHORT))) for m in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def second_turn_ttft(engine, history: int, sequences: int) -> tuple[float, int]:
    """(TTFT in ms, prompt tokens prefilled) of a conversation's second turn after recycling."""
    engine.drop_cached_prompts()
    turn1 = [{"role": "user", "content": document(engine, history) + "\n\nSummarise this in one short sentence."}]
    answer = collect(engine.chat(turn1, SHORT)).text
    recycle(engine, sequences)
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Who keeps the ledger?"}]
    prefilled = engine.prefilled_tokens
    started = time.perf_counter()
    stream = engine.chat(turn2, SHORT)
    next(iter(stream))
    ttft = (time.perf_counter() - started) * 1000
    collect(stream)
    return ttft, engine.prefilled_tokens - prefilled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--history", type=int, default=1500, help="tokens of the first turn's document")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args()
    rows = {}
    for label, cache_ram in (("before (--cache-ram 0)", 0), ("after (--cache-ram 1024)", 1024)):
        engine = load_engine(args.model, backend="llama.cpp", n_ctx=4096, n_parallel=args.n_parallel,
                             n_threads=args.threads, cache_ram_mib=cache_ram)
        try:
            second_turn_ttft(engine, args.history, args.n_parallel + 1)  # warm-up
            runs = [second_turn_ttft(engine, args.history, args.n_parallel + 1) for _ in range(args.repeats)]
        finally:
            engine.close()
        rows[label] = (statistics.median(ttft for ttft, _ in runs), statistics.median(n for _, n in runs))
    print(f"model {args.model}, {args.threads} threads, {args.n_parallel} sequences (+1), first turn "
          f"~{args.history} tokens, median of {args.repeats}")
    print(f"{'':26} | second-turn TTFT ms | prompt tokens prefilled")
    for label, (ttft, prefilled) in rows.items():
        print(f"{label:26} | {ttft:19.0f} | {prefilled:23.0f}")
    before, after = rows.values()
    print(f"after / before: TTFT {after[0] / before[0]:.2f}x")


if __name__ == "__main__":
    main()
