#!/usr/bin/env bash
# One prepared GPU run (build, GPU tests, ceilings, kernel and step benchmarks); see bench/gpu_run.py.
#
# On the device machine (python3 there holds torch 2.11 + CUDA 13.0 and triton 3.6; $OUT is the
# folder whose files come back), from the repository root:
#     bash bench/gpu_run.sh                                # every part, about 8 minutes at most
#     bash bench/gpu_run.sh --parts kernels,step           # a second call finishes the rest
#     bash bench/gpu_run.sh --parts step --resume bench/results/nvidia-h100-80gb-hbm3.json
# Optional wheels (liger-kernel for the Liger baselines, nvtx): put them in .whl/ (git-excluded)
# and carry that folder; bench/NOTES.md says how to fetch them. On a CPU machine:
#     python bench/gpu_run.py --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_run.py "$@"
