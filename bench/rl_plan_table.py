"""The ``--plan`` peak of each RL recipe on 0.5B, 1.5B and 7B Qwen2-class models, as README.md's markdown table.

    .venv/bin/python bench/rl_plan_table.py [--gpu-gib 24]

For each of ppo, grpo, dapo, gspo and dcpo the settings are ``recipes/<method>.yaml``'s, only the model changes. The
shapes are published config.json values (``_gpu_bench.SIZES``: Qwen2.5-0.5B-Instruct, DeepSeek-R1-Distill-Qwen-1.5B
and -7B), so nothing is downloaded and no GPU is needed: the numbers are the estimate, not a measurement
(``bench/ppo_gpu_memory.py`` measures PPO on a GPU). "fits" is the verdict ``--plan`` prints on a GPU of
``--gpu-gib`` GiB: the peak within the trainer's budget less the plan's 10% margin, where a recipe with
``rollout_backend: vllm`` leaves the in-process vLLM engine its share of the GPU first.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _gpu_bench import REPO, qwen2_config

METHODS = ("ppo", "grpo", "dapo", "gspo", "dcpo")
# (column title, _gpu_bench size): the models the recipes are written for and one size either side.
MODELS = (
    ("Qwen2.5-0.5B-Instruct", "0.5b"),
    ("R1-Distill-Qwen-1.5B", "1.5b"),
    ("R1-Distill-Qwen-7B", "7b"),
)


def recipe(method: str) -> Any:
    """``recipes/<method>.yaml`` read as the method's config, as ``tandem align <method> --config`` reads it."""
    from tandemlm.align.config import build_config
    from tandemlm.align.registry import get_method

    return build_config(get_method(method).config_cls, REPO / "recipes" / f"{method}.yaml")


def settings(config: Any) -> list[str]:
    """What sizes a step of the recipe: completions (prompts x group), rows per forward in the update, response
    tokens, rollout backend."""
    group = getattr(config, "num_generations", 1)
    per_step = f"{config.batch_size} ({config.prompts_per_step} x {group})" if group > 1 else str(config.batch_size)
    rows = config.rows_per_minibatch // config.grad_accum
    return [per_step, str(rows), str(config.max_completion_length), config.rollout_backend]


def cell(config: Any, size: str, gpu: int) -> str:
    """``peak GiB, yes|no`` for the recipe on the ``size`` model and a ``gpu``-byte GPU."""
    from tandemlm.align.ppo.method import plan_budget
    from tandemlm.align.ppo.plan import GIB, estimate, fits, inputs_from_config

    # cuda=True resolution is what the recipe gets on the GPU; the recipes set lora, bf16 and checkpointing anyway.
    plan = estimate(inputs_from_config(qwen2_config(size), config))
    _, budget = plan_budget(config, plan.weights, ("GPU", gpu))
    return f"{plan.total / GIB:.1f}, {'yes' if fits(plan, budget) else 'no'}"


def table(gpu_gib: float) -> str:
    """The markdown table: one row per method, one column per model."""
    gpu = int(gpu_gib * 1024**3)
    header = ["method", "completions per step", "rows per forward", "response tokens", "rollout"]
    header += [f"{title}: GiB, fits" for title, _ in MODELS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * 3 + "---|" + "---:|" * len(MODELS)]
    for method in METHODS:
        config = recipe(method)
        row = [f"`{method}`", *settings(config)] + [cell(config, size, gpu) for _, size in MODELS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="GPU memory the verdict is for, in GiB")
    args = parser.parse_args()
    print(table(args.gpu_gib))
    from tandemlm.align.ppo.vllm_rollout import GPU_MEMORY_UTILIZATION

    share = args.gpu_gib * GPU_MEMORY_UTILIZATION
    print(f"\nfits: peak <= 90% of {args.gpu_gib:g} GiB, or of {args.gpu_gib - share:g} GiB beside vLLM's "
          f"{GPU_MEMORY_UTILIZATION:.0%} ({share:g} GiB) with rollout_backend vllm. Recipes: {Path('recipes')}/<method>.yaml")


if __name__ == "__main__":
    main()
