#!/usr/bin/env bash
# The RL family compared on one task, budget and seed (issue 21): each algorithm's cpu-demo (SmolLM2-135M,
# LoRA on the last 8 layers, about 480 generated samples: 30 steps x 16, DAPO 13 steps of 16 kept; one torch thread)
# trained and then measured by
#   `tandem align eval RUN --samples 3 --temperature 1.0` on held-out prompts, then one `tandem align compare`.
#
# Usage: bash scripts/demo_rl_family.sh OUT_DIR RUN [RUN ...]
#   RUN is NAME=METHOD[:TASK][,FLAG=VALUE...], e.g. grpo=grpo  dapo-b=dapo,beta=0.04,learning-rate=1e-3
#   grpo-arith=grpo:arithmetic. TASK is capitals (default) or arithmetic (builtin:<task>_train / _test).
#   Runs already finished (final/ and eval.json present) are kept. Two invocations side by side (two lanes, one
#   thread each) use both cores of a 2-core machine.
#   COMPARE_ONLY=1 bash scripts/demo_rl_family.sh OUT_DIR RUN ...   just prints the table and writes the figure.
set -euo pipefail

OUT=$1
shift
TANDEM=${TANDEM:-$(dirname "$0")/../.venv/bin/tandem}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$OUT"

folders=()
for spec in "$@"; do
  name=${spec%%=*}
  rest=${spec#*=}
  IFS=, read -r -a parts <<< "$rest"
  method_task=${parts[0]}
  method=${method_task%%:*}
  task=capitals
  [[ $method_task == *:* ]] && task=${method_task#*:}
  flags=(--dataset "builtin:${task}_train" --eval-dataset "builtin:${task}_test")
  for flag in "${parts[@]:1}"; do
    flags+=("--${flag%%=*}" "${flag#*=}")
  done
  run="$OUT/$name"
  folders+=("$run")
  [ -n "${COMPARE_ONLY:-}" ] && continue
  if [ ! -f "$run/final/adapter_config.json" ]; then
    start=$SECONDS
    "$TANDEM" align "$method" --preset cpu-demo --output-dir "$run" "${flags[@]}" > "$OUT/$name.log" 2>&1
    echo "$name train $((SECONDS - start))" >> "$OUT/times.txt"
  fi
  if [ ! -f "$run/eval.json" ]; then
    start=$SECONDS
    "$TANDEM" align eval "$run" --dataset "builtin:${task}_test" --samples 3 --temperature 1.0 > "$OUT/$name.eval.log" 2>&1
    echo "$name eval $((SECONDS - start))" >> "$OUT/times.txt"
  fi
done
"$TANDEM" align compare "${folders[@]}" --out "$OUT/compare.png" --json "$OUT/compare.json"
