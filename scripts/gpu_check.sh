#!/usr/bin/env bash
# The GPU check of rnnfast, as one command on a CUDA machine that has torch
# installed and no internet:
#
#   scripts/gpu_check.sh OUTDIR
#
# Stages, each logged to OUTDIR/<stage>.log with its exit code and time:
#   env        GPU, driver, torch, toolkit; fails if torch sees no GPU
#   build      pip install --no-build-isolation --no-deps -e . with the system
#              python (falls back to setup.py build_ext --inplace), for the
#              visible GPU's arch only, RNNFAST_FORCE_CUDA=1
#   tests      pytest -q tests -k cuda (junit XML in OUTDIR/pytest.xml)
#   memcheck   compute-sanitizer memcheck on scripts/sanitize_case.py
#   bench      python -m rnnfast.bench ... --out OUTDIR/bench (skipped, not
#              failed, while that module does not exist)
#   initcheck  compute-sanitizer initcheck on scripts/sanitize_case.py
# A failed stage does not stop the later ones. OUTDIR/results.json sums up
# every stage; the exit code is non-zero if any stage failed. The whole run is
# kept within GPU_CHECK_BUDGET_S seconds (default 470, under 8 minutes):
# each stage's time limit is cut to what is left.
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S, MAX_JOBS
# (default: the CPU count), TORCH_CUDA_ARCH_LIST (default: the visible GPUs).
set -u

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
STAGES="$OUT/stages.tsv"
: > "$STAGES"
FAILED=0
export PY OUT ROOT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# run_stage NAME LIMIT_S CMD...: runs CMD with its output in OUTDIR/NAME.log,
# under the smaller of LIMIT_S and the time left, and records the outcome.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    say "$name: not run, the time budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" "-1" "0" "not run: time budget spent" >> "$STAGES"
    FAILED=1
    return 1
  fi
  say "$name: running (limit ${limit}s): $*"
  local t0 rc note=""
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" >> "$STAGES"
  say "$name: exit code $rc ($(($(date +%s) - t0))s) $note"
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    tail -n 25 "$OUT/$name.log" | sed "s/^/  [$name] /"
  fi
  return "$rc"
}

# Records a stage that was deliberately not run, without failing the check.
skip_stage() {
  say "$1: skipped: $2"
  printf '%s\t%s\t%s\t%s\n' "$1" "0" "0" "skipped: $2" >> "$STAGES"
}

stage_env() {
  nvidia-smi || echo "(nvidia-smi not available)"
  command -v nvcc && nvcc --version
  command -v ninja && ninja --version
  echo "python: $PY"
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "(no git checkout)"
  "$PY" - <<'EOF'
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cpus", os.cpu_count())
if not torch.cuda.is_available():
    raise SystemExit("torch sees no GPU: the CUDA checks would only be skipped")
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
EOF
}

stage_build() {
  if "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    :
  else
    echo "pip install -e . failed; building in place with setup.py instead"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" - "$OUT/build_info.json" <<'EOF'
import json, sys
import rnnfast
info = rnnfast.build_info()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
if not info["with_cuda"]:
    raise SystemExit("rnnfast was built without its CUDA kernels")
EOF
}

find_sanitizer() {
  command -v compute-sanitizer && return 0
  local d
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && echo "$d/bin/compute-sanitizer" && return 0
  done
  return 1
}

stage_sanitize() {
  local tool=$1 sanitizer
  if ! sanitizer=$(find_sanitizer); then
    echo "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"
    return 1
  fi
  # No caching allocator: every tensor is its own allocation, so reads past
  # a tensor's end are reported instead of landing in a neighbour. API errors
  # from torch's and cuBLAS's start-up probes are not ours; an API error in
  # rnnfast raises in Python and fails the case anyway.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    --report-api-errors no "$PY" scripts/sanitize_case.py
}

# --- stages ----------------------------------------------------------------
export -f stage_env stage_build find_sanitizer stage_sanitize
say "rnnfast GPU check in $ROOT, results in $OUT, budget ${BUDGET}s"
run_stage env 60 bash -c stage_env

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "
import torch
caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
print(';'.join('%d.%d' % c for c in sorted(caps)))" 2>/dev/null)
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export RNNFAST_FORCE_CUDA=1
say "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MAX_JOBS=$MAX_JOBS"
run_stage build 240 bash -c stage_build

run_stage tests 150 "$PY" -m pytest -q -rs tests -k cuda -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml"

run_stage memcheck 100 bash -c "stage_sanitize memcheck"

if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('rnnfast.bench') is None)" \
    > /dev/null 2>&1; then
  run_stage bench 100 "$PY" -m rnnfast.bench --device cuda --dtype float32 bfloat16 \
    --T 100 --B 64 --I 512 --H 512 --out "$OUT/bench"
else
  skip_stage bench "rnnfast.bench does not exist in this checkout"
fi

run_stage initcheck 70 bash -c "stage_sanitize initcheck"

# --- summary ---------------------------------------------------------------
"$PY" - "$OUT" "$FAILED" "$(($(date +%s) - START))" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, failed, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stages = []
for line in open(os.path.join(out, "stages.tsv")):
    name, rc, secs, note = (line.rstrip("\n").split("\t") + [""])[:4]
    stages.append(dict(name=name, exit_code=int(rc), seconds=int(secs), note=note,
                       log=f"{name}.log" if os.path.exists(os.path.join(out, f"{name}.log")) else None))
result = dict(ok=not failed, seconds=seconds, stages=stages)
try:
    root = ET.parse(os.path.join(out, "pytest.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    result["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["tests"]["failed"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None]
except Exception as e:  # no XML: the tests stage did not run or crashed
    result["tests"] = f"no junit XML: {e}"
for key, name in (("build_info", "build_info.json"),):
    try:
        result[key] = json.load(open(os.path.join(out, name)))
    except Exception:
        result[key] = None
try:
    import torch
    result["torch"] = torch.__version__
    result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as e:
    result["torch"] = f"import failed: {e}"
json.dump(result, open(os.path.join(out, "results.json"), "w"), indent=2)
print(json.dumps({k: result[k] for k in ("ok", "seconds", "tests", "gpu")}, indent=2))
for s in stages:
    print(f"  {s['name']:<10} exit {s['exit_code']:>4}  {s['seconds']:>4}s  {s['note']}")
EOF

say "done: $([ "$FAILED" -eq 0 ] && echo all stages passed || echo SOME STAGES FAILED)"
exit "$FAILED"
