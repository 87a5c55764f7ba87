"""What installing rnnfast meets before any kernel runs: a source
distribution that holds what building and testing it needs, and a clear
refusal of a torch older than it supports (rnnfast/_torch_version.py).

setuptools puts into an sdist the Python packages and the C++/CUDA files that
setup.py lists as sources in the environment that builds it: not the headers
those sources include, and not the CUDA sources when that environment builds
the CPU kernels only. Without MANIFEST.in, `pip install rnnfast-*.tar.gz`
failed at the first #include. This builds an sdist of a copy of the checkout
the way a CPU-only machine would (the fewest listed sources) and checks that
every file of the extension, the package, the tests, the examples, the
scripts and the set-up is in it, and nothing built."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# What a build or `make test` from an unpacked sdist reads.
TOP_FILES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "Makefile",
             "benchmarks/README.md"]
TREES = {"csrc": None, "rnnfast": None, "tests": None, "examples": ".py", "scripts": None,
         "docs": None}
BUILT = (".so", ".o", ".pyc", ".pyd")
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "bench-out", "results",
                                  "__pycache__", ".pytest_cache", "*.egg-info", "*.so", "*.o",
                                  "*.pyc")


def _expected() -> set[str]:
    files = set(TOP_FILES)
    for tree, suffix in TREES.items():
        for path in (ROOT / tree).rglob("*"):
            rel = path.relative_to(ROOT)
            if (path.is_file() and "__pycache__" not in rel.parts
                    and not path.name.endswith(BUILT)
                    and (suffix is None or path.suffix == suffix)):
                files.add(rel.as_posix())
    return files


def test_source_distribution_holds_every_file_a_build_needs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=LEFT_OUT)
    out = tmp_path / "dist"
    env = dict(os.environ, RNNFAST_SKIP_CUDA="1")
    run = subprocess.run(
        [sys.executable, "-c",
         "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))", str(out)],
        cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as sdist:
        members = [m.name.split("/", 1)[1] for m in sdist.getmembers()
                   if m.isfile() and "/" in m.name]
    missing = sorted(_expected() - set(members))
    assert not missing, f"left out of the sdist: {missing}"
    built = [m for m in members if m.endswith(BUILT)]
    assert not built, f"build outputs in the sdist: {built}"
    # every header of the CPU and CUDA kernels, named: the files a CPU-only
    # setup.py never lists
    assert {"csrc/lstm_cell.h", "csrc/cuda/lstm_kernels.cuh",
            "csrc/cuda/lstm_forward_step.cu"} <= set(members)


# -- the oldest torch -----------------------------------------------------------

def test_torch_versions_read_and_checked():
    from rnnfast._torch_version import MIN_TORCH, check_torch, torch_release

    major, minor = MIN_TORCH
    assert torch_release("2.14.1+cu130") == (2, 14)
    assert torch_release("2.6.0a0+git1234abc") == (2, 6)
    assert torch_release(torch.__version__) >= MIN_TORCH  # this suite's own torch
    for ok in (f"{major}.{minor}.0", f"{major}.{minor}.1+cpu", f"{major}.{minor + 1}.0a0+git12",
               f"{major + 1}.0.0"):
        check_torch(ok)
    need = rf"needs torch >= {major}\.{minor}, found torch "
    for old in (f"{major}.{minor - 1}.1", f"{major}.{minor - 1}.0+cu121", "1.13.1"):
        with pytest.raises(ImportError, match=need + re.escape(old)):
            check_torch(old)
    with pytest.raises(ValueError, match="cannot read"):
        torch_release("nightly")


# -- an extension built against another torch -------------------------------------

def test_extension_records_the_torch_it_was_built_against():
    """The library file holds the marker that a failed load reads, and it
    names the torch build_info() reports."""
    import rnnfast
    from rnnfast._torch_version import built_against

    (library,) = Path(rnnfast.__file__).parent.glob("_C*.so")
    assert built_against(library) == rnnfast.build_info()["torch_version"]
    assert rnnfast._C.built_against_torch == rnnfast.build_info()["torch_version"]


def test_import_asks_nothing_of_the_cpu_settings():
    """The import's torch check reads the built-against version alone, not
    build_info(), whose CPU queries check RNNFAST_CPU_NATIVE_BF16: a bad
    value is refused when a bfloat16 op (or build_info) needs it, not by the
    import."""
    env = dict(os.environ, RNNFAST_CPU_NATIVE_BF16="x")
    code = ("import rnnfast\n"
            "try:\n"
            "    rnnfast.build_info()\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: RNNFAST_CPU_NATIVE_BF16 must be 0 or 1, got 'x'" in run.stdout


def test_load_error_names_both_torches(tmp_path):
    """A library that fails to load (undefined symbols, a CUDA library of
    another release) under another torch than it was built against gives an
    ImportError naming both and the rebuild; otherwise the error is kept."""
    from rnnfast._torch_version import built_against, load_error

    library = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    library.write_bytes(b"\x7fELF\x00junk\x00rnnfast-built-against-torch=2.14.1+cu130\x00more")
    assert built_against(library) == "2.14.1+cu130"
    cause = ImportError(f"{library}: undefined symbol: _ZN3c104cuda19CUDAErrorLogCaptureC1Ev")
    error = load_error(cause, "2.12.1+cu130", tmp_path)
    message = str(error)
    assert isinstance(error, ImportError) and error is not cause
    assert "built against torch 2.14.1+cu130" in message
    assert "installed torch 2.12.1+cu130" in message and "undefined symbol" in message
    assert "pip install --no-build-isolation --no-deps ." in message
    assert load_error(cause, "2.14.1+cu130", tmp_path) is cause  # same torch: not the cause
    assert load_error(cause, "2.12.1", tmp_path / "elsewhere") is cause  # no library to read
    library.write_bytes(b"\x7fELF no marker")
    assert load_error(cause, "2.12.1", tmp_path) is cause


def test_mismatch_warned_across_torch_releases():
    from rnnfast._torch_version import mismatch_warning

    assert mismatch_warning("2.14.1+cu130", "2.14.2") is None
    message = mismatch_warning("2.14.1+cu130", "2.15.0")
    assert "built against torch 2.14.1+cu130 and runs with torch 2.15.0" in message


OLD_TORCH = "2.4.1"  # older than any floor rnnfast could have


def _old_torch(tmp_path, *path) -> dict:
    """An environment whose `import torch` finds a stand-in that says it is
    OLD_TORCH."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f'__version__ = "{OLD_TORCH}"\n')
    return dict(os.environ, RNNFAST_SKIP_CUDA="1",
                PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), *map(str, path)]))


def test_build_refuses_an_old_torch_before_compiling(tmp_path):
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT,
                         env=_old_torch(tmp_path), capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"found torch {OLD_TORCH}; upgrade torch" in run.stderr


def test_import_refuses_an_old_torch(tmp_path):
    run = subprocess.run([sys.executable, "-c", "import rnnfast"], cwd=tmp_path,
                         env=_old_torch(tmp_path, ROOT), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "ImportError: rnnfast needs torch >= " in run.stderr
    assert f"found torch {OLD_TORCH}; upgrade torch" in run.stderr
