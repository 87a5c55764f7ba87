#!/usr/bin/env bash
# The GPU check of rnnfast, as one command on a CUDA machine that has torch,
# nvcc and ninja installed and no internet:
#
#   scripts/gpu_check.sh OUTDIR [--quick] [--budget S] [--work DIR] [--dry-run]
#
# Stages, in order, each with its own log, exit code and time (the stage
# runner and its budget rules are in scripts/gpu_check.py):
#   env          GPU, driver, torch, toolkit; fails fast without nvcc or ninja
#   build        pip install --no-build-isolation --no-deps -e . for the
#                visible GPU's arch only (nvidia-smi's compute_cap)
#   test_cuda    pytest tests/test_cuda.py (junit XML test_cuda.xml)
#   tests_cuda   the other CUDA tests (-k cuda), Inductor compiles left out
#   memcheck, racecheck, synccheck, initcheck
#                compute-sanitizer on scripts/sanitize_case.py, at once
#                (racecheck and synccheck on rnnfast's kernels only, where
#                the tool has --kernel-name)
#   bench        python -m rnnfast.bench --grid gpu (the GPU preset)
#   ncu          Nsight Compute: time per kernel of one training step
#   bench_zoneout  zoneout against a Python loop over nn.LSTMCell (issue 15)
#   bench_unfused  decode with the fused small-batch step off, to compare
# --quick runs build, test_cuda and bench only (under 5 minutes).
#
# The whole check keeps within GPU_CHECK_BUDGET_S seconds (default 530, 280
# with --quick): a stage is cut so that every later stage keeps its minimum,
# and one left too little time is recorded as skipped, not failed. OUTDIR
# gets stages.md and stages.json (the stage table), gpu_check.tar.gz (every
# log, junit XML and output) and copies of the bench's results.json and the
# kernel times: few files, as a device machine returns at most eight.
# Exit code 0 only when no stage failed or timed out.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, MAX_JOBS
# (default: the CPU count), TORCH_CUDA_ARCH_LIST (default: the visible GPUs).
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [--quick] [--budget S] [--work DIR] [--dry-run]" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 2
PY=${PYTHON:-$(command -v python3 || command -v python)}
if [ -z "$PY" ]; then
  echo "gpu_check: no python3 on PATH (set PYTHON)" >&2
  exit 2
fi
export PYTHON="$PY" PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
