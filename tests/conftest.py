"""Fixtures shared by the rnnfast tests; plain helpers are in utils.py.

CUDA is only queried inside fixtures, never at import time, so collecting
the suite never initialises a GPU.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Inductor's on-disk caches key a compiled graph by its code, not by the fake
# kernels of the custom ops in it, so a cache left by an earlier build of
# rnnfast would replay that build's promised strides. Each test session
# compiles into a fresh cache of its own (unless one is chosen explicitly).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="rnnfast-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# `from utils import ...` in every test file, whatever pytest's import mode.
sys.path.insert(0, os.path.dirname(__file__))

from utils import CELLS, Cell  # noqa: E402

# RNNFAST_TEST_CUDA_BACKEND_ON_CPU=1: rnnfast's CPU ops run the CUDA backend's
# code under the CPU emulation of the GPU (tests/simt_emulation.py), so the
# CPU tests check it (test_simt.py runs a selection of them this way).
if os.environ.get("RNNFAST_TEST_CUDA_BACKEND_ON_CPU"):
    import simt_emulation  # noqa: E402
    simt_emulation.route_cpu_ops_through_emulation()


def _skip_unless_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    import rnnfast
    if not rnnfast.build_info()["with_cuda"]:
        pytest.skip("rnnfast was built without CUDA kernels")


@pytest.fixture
def _no_tf32():
    """Full float32 matmuls (cuDNN's LSTM uses TF32 by default, too coarse
    for float32 parity tolerances)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Every device rnnfast can run on here: CPU always, CUDA when present."""
    if request.param == "cuda":
        _skip_unless_cuda()
        request.getfixturevalue("_no_tf32")
    return request.param


@pytest.fixture
def cuda_device(_no_tf32) -> str:
    """For CUDA-only tests."""
    _skip_unless_cuda()
    return "cuda"


@pytest.fixture(params=CELLS, ids=repr)
def cell(request) -> Cell:
    """Every recurrent cell rnnfast has (utils.CELLS): the shared tests of
    test_cells.py run over ``cell x device``."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """A fixed global seed for every test (modules are initialised from it)."""
    torch.manual_seed(0)
    yield
