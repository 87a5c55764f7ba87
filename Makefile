# Two commands do all the set-up from a fresh clone:
#   make test   - .venv, dependencies, build, the whole test suite
#   make bench  - the same set-up, then the benchmark
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is a CUDA 13.0 build, so the CUDA kernels compile even on a
# machine without a GPU; any torch>=2.8 works (TORCH_SPEC=torch==2.13.0 for
# the CPU-only build).
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy pytest pytest-xdist expecttest ninja rich matplotlib scikit-learn onnx onnxruntime onnxscript "setuptools>=77" wheel

.PHONY: test bench build clean test-aarch64 test-avx2

# The stamp names the torch asked for, so that another TORCH_SPEC installs
# it into the existing venv instead of keeping the one installed first.
DEPS_STAMP := $(VENV)/.deps-$(shell printf '%s' '$(TORCH_SPEC)' | tr -c 'A-Za-z0-9.+-' '_')

$(DEPS_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	rm -f $(VENV)/.deps-*
	touch $@

build: $(DEPS_STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q tests

# The default preset (< 5 min on a 2-core CPU) into bench-out/ (gitignored);
# BENCH_ARGS adds options, e.g. BENCH_ARGS=--compile for torch.compile of the
# reference (minutes of compiling per case on a CPU);
# `$(PY) -m rnnfast.bench --help` for the axes, presets and subcommands.
BENCH_ARGS ?=
bench: build
	$(PY) -m rnnfast.bench --out bench-out $(BENCH_ARGS)

# The suite on 64-bit ARM Linux, built with Debian's cross compiler and run
# under qemu here (needs root for apt and binfmt_misc; ~45 minutes on 2
# cores; not part of `test`). scripts/aarch64_check.sh says what it shows.
test-aarch64: $(DEPS_STAMP)
	PYTHON=$(PY) bash scripts/aarch64_check.sh

# The suite as it runs on an AMD EPYC with AVX2 only (no AVX-512), under
# qemu's user-mode emulation of that CPU (installs qemu-user when missing,
# which needs root; ~100 minutes on 2 cores; not part of `test`).
# scripts/avx2_check.sh says what it shows.
test-avx2: build
	VENV=$(VENV) bash scripts/avx2_check.sh

clean:
	rm -rf build rnnfast/_C*.so *.egg-info
