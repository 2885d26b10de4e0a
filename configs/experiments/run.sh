#!/usr/bin/env bash
# The experiment grid of docs/EXPERIMENTS.md. Each cell is configs/experiments/<cell>.yaml, run
# once per seed into runs/exp/<cell>_s<seed>/ (metrics.jsonl, summary.json, report.html). The SFT
# checkpoint a cell starts from, runs/exp/sft_base_s<seed>/final, is built first when missing.
# Finished runs are skipped and interrupted ones resume, so the script can be stopped and rerun.
#   configs/experiments/run.sh                          # every cell, seeds 0 1 2
#   configs/experiments/run.sh sft_rl_high guard        # some cells
#   SEEDS="1 2" configs/experiments/run.sh guard        # some seeds
#   nohup configs/experiments/run.sh > runs/exp.log 2>&1 &    # in the background
# One run at a time: two runs sharing 2 CPU cores were each up to 8x slower than one alone.
# Then: .venv/bin/python configs/experiments/table.py   # the results table (mean and spread)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
ALL=(sft_rl sft_rl_high guard guard_lr ops_high ops_luffy_high hbg_high ets_high prs_high
  mixed_sft_high ops ops_luffy hbg ets prs mixed_sft vanilla_rl)
cells=("$@")
[ ${#cells[@]} -eq 0 ] && cells=("${ALL[@]}")
mkdir -p runs/exp

run() {  # run CELL SEED [overrides...]
  local cell=$1 seed=$2 dir=runs/exp/$1_s$2
  shift 2
  if [ -f "$dir/summary.json" ]; then echo "$cell seed $seed: done ($dir)"; return 0; fi
  echo "$cell seed $seed: running ($(date +%H:%M))"
  if "$PY" -m fastrl train --config "configs/experiments/$cell.yaml" --resume-if-any \
    seed="$seed" run_dir="$dir" progress=false "$@" > "$dir.log" 2>&1; then
    "$PY" -m fastrl report "$dir" > /dev/null 2>> "$dir.log" || true
    echo "$cell seed $seed: $(tail -n 1 "$dir.log" | cut -c1-160)"
  else
    echo "$cell seed $seed: failed, see $dir.log"
    return 1
  fi
}

for cell in "${cells[@]}"; do  # cell by cell, so the finished cells have all their seeds
  for seed in $SEEDS; do
    if grep -q "^  name: runs/exp/sft_base" "configs/experiments/$cell.yaml"; then
      run sft_base "$seed" || continue
      run "$cell" "$seed" model.name="runs/exp/sft_base_s$seed/final" || true
    else
      run "$cell" "$seed" || true
    fi
  done
done
