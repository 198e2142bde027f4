#!/usr/bin/env bash
# Builds .venv-trl112: TRL 1.12.0, the last release with a PPO trainer (trl.experimental.ppo), as the baseline of
# bench/ppo_step.py. A separate venv on purpose: TRL 1.12 is never a dependency of tandemlm (ours is TRL 1.16,
# which has no PPO). Safe to run again: pip only adds what is missing. About 1-2 minutes.
#   bash scripts/make_trl112_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-trl112
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# CPU torch from local disk first: nothing installed after it may pull a multi-GB CUDA build.
"${pip[@]}" install -q torch==2.13.0
# transformers as in tandemlm's own venv (pyproject caps it below 5.20), so both sides run the same model code;
# TRL 1.12 also ran with 5.23 and 5.24. peft for --lora (TRL's peft_config).
"${pip[@]}" install -q trl==1.12.0 transformers==5.19.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0
TRL_EXPERIMENTAL_SILENCE=1 "$venv/bin/python" -c "import trl, transformers, torch; from trl.experimental.ppo import PPOTrainer; \
print(f'{trl.__version__=} {transformers.__version__=} {torch.__version__=}')"
echo "TRL 1.12 baseline venv ready in $venv"
