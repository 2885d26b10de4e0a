#!/usr/bin/env bash
# The small-scale experiments of docs/EXPERIMENTS.md, in order. Stage 1 (sft_base) must exist
# before the SFT->RL cells; each run writes runs/exp/<cell>/ and its report.
#   configs/experiments/run.sh                      # every cell, seed 0
#   configs/experiments/run.sh sft_rl_high guard    # some cells
#   SEED=1 configs/experiments/run.sh guard         # another seed (runs/exp/<cell>_s1)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEED=${SEED:-0}
cells=("$@")
if [ ${#cells[@]} -eq 0 ]; then
  cells=(sft_base vanilla_rl sft_rl sft_rl_mid sft_rl_high ops ops_luffy hbg ets prs mixed_sft guard
    guard_lr)
fi
for cell in "${cells[@]}"; do
  dir=runs/exp/$cell
  [ "$SEED" != 0 ] && dir=${dir}_s$SEED
  if [ -f "$dir/summary.json" ]; then echo "$cell: done ($dir)"; continue; fi
  "$PY" -m fastrl train --config "configs/experiments/$cell.yaml" seed="$SEED" run_dir="$dir" \
    progress=false > "$dir.log" 2>&1 || { echo "$cell: failed, see $dir.log"; continue; }
  "$PY" -m fastrl report "$dir" > /dev/null
  echo "$cell: $(tail -n 1 "$dir.log")"
done
