#!/usr/bin/env bash
# Runs rnnfast's test suite as it would run on an AMD EPYC with AVX2 only
# (no AVX-512), on whatever x86-64 machine this is, under qemu's user-mode
# emulation of that CPU:
#
#   scripts/avx2_check.sh [WORKDIR] [pytest arguments...]
#
# Everything in the Python process sees the emulated CPU's CPUID: vendor
# AuthenticAMD, AVX2 and FMA, no AVX-512. So torch picks its AVX2 kernels,
# MKL its paths for an AMD CPU, and rnnfast its AVX2 kernels, int8 ones
# included, by the same run-time checks that a real EPYC answers. The extension is the one
# `make build` made (setup.py never compiles for the build machine's CPU).
#
# WORKDIR (default /tmp/rnnfast-avx2) gets a venv shim: a `bin/python` that
# starts this checkout's venv Python under qemu-x86_64, beside links to the
# venv's packages, so that sys.executable (pytest-xdist's workers, the tests'
# subprocesses) is emulated too; and a g++ wrapper that reads -march=native
# (torch.compile's C++ code) as x86-64-v3 (AVX2, FMA, BMI2, F16C), since the
# compiler itself runs natively. The pytest arguments default to the whole
# suite.
#
# What it shows: the code, the tests' expectations and their skips hold on a
# CPU without AVX-512, with AMD's CPUID. What it cannot show: speed (qemu
# translates every instruction), and anything qemu 7.2's TCG does not
# emulate of a real Zen 2 (it has no AVX-512 either way).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/rnnfast-avx2}
shift || true
VENV=$(cd "${VENV:-$ROOT/.venv}" 2>/dev/null && pwd) || VENV=${VENV:-$ROOT/.venv}
# qemu's model of a Zen 2 EPYC (AVX2, no AVX-512), less the features qemu
# 7.2's TCG cannot emulate (it warns of each, on every start, otherwise).
AVX2_CPU=${AVX2_CPU:-EPYC-Rome,-xsaves,-xsavec,-rdseed,-sha-ni,-rdpid,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-perfctr-core,-clzero,-xsaveerptr,-wbnoinvd,-ibpb,-amd-stibp,-nrip-save}

say() { echo "avx2_check: $*" >&2; }
# shellcheck source=emulation_lib.sh
. "$ROOT/scripts/emulation_lib.sh"

if ! command -v qemu-x86_64 >/dev/null; then
  say "installing qemu-user"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi
[ -x "$VENV/bin/python" ] || { say "no venv at $VENV: run 'make build' first"; exit 1; }

# ---- the venv shim ------------------------------------------------------------
# Python finds its prefix from pyvenv.cfg beside bin/ of argv[0], which qemu's
# -0 sets to the shim; its lib/ is the real venv's, so the packages (and the
# editable rnnfast) are the same ones.
PYREAL=$(readlink -f "$VENV/bin/python")
rm -rf "$WORK/venv" "$WORK/bin"
mkdir -p "$WORK/venv/bin" "$WORK/bin"
cp "$VENV/pyvenv.cfg" "$WORK/venv/"
ln -s "$VENV/lib" "$WORK/venv/lib"
[ ! -e "$VENV/lib64" ] || ln -s lib "$WORK/venv/lib64"
cat > "$WORK/venv/bin/python" <<EOF
#!/bin/sh
exec qemu-x86_64 -cpu "$AVX2_CPU" -0 "\$0" "$PYREAL" "\$@"
EOF
chmod +x "$WORK/venv/bin/python"
ln -s python "$WORK/venv/bin/python3"
PY=$WORK/venv/bin/python

# ---- the compiler that the tests call (Inductor, cpp_extension) ----------------
write_march_wrapper "$WORK/bin/g++" "$(command -v "${CXX:-g++}")" -march=x86-64-v3
export PATH=$WORK/venv/bin:$WORK/bin:$PATH CXX=$WORK/bin/g++

# oneDNN (nn.LSTM's kernel) is held to AVX: its AVX2 RNN (brgemm, JIT-written
# code) dies of a segmentation fault under qemu 7.2's TCG, Intel or AMD model
# alike, where real AVX2 CPUs run it. So nn.LSTM runs oneDNN's reference RNN
# here, and runs in bfloat16 too, where oneDNN refused that on a real EPYC
# (issue 13): the tests' fallback for that refusal is not reached.
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX}

"$PY" -c '
import json, torch, rnnfast
print("avx2_check: torch", torch.__version__, "sees", torch.backends.cpu.get_cpu_capability())
print("avx2_check:", json.dumps(rnnfast.build_info()))' >&2

# ---- the tests ------------------------------------------------------------------
# By default every test but two that take hours under qemu and run no CPU
# kernel that the others do not: tests/test_examples.py (the examples'
# trainings, minutes natively) and the CUDA emulation's rerun under
# AddressSanitizer (over its 15-minute limit). 2026-11-30 on a 2-vCPU Xeon:
# about 100 minutes.
[ $# -gt 0 ] || set -- -q -rfEs -n "$(nproc)" -o faulthandler_timeout=1200 \
  --ignore=tests/test_examples.py \
  --deselect tests/test_simt.py::test_emulated_backend_under_address_sanitizer tests
say "pytest $* (log: $WORK/tests.log)"
cd "$ROOT"
set +e
"$PY" -m pytest -p no:cacheprovider "$@" 2>&1 | tee "$WORK/tests.log"
exit "${PIPESTATUS[0]}"
