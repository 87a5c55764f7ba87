"""The CUDA backend run on the CPU by an emulation of the GPU
(csrc/cuda/simt_emulation.h), against the CPU backend.

rnnfast's CUDA path (its kernels, their launch shapes, its cuBLAS calls, and
the shared drivers with CudaBackend's choices: native half types, one
LayerNorm parameter-gradient launch, whole-sequence GEMMs) is compiled here
by the host compiler, with every kernel launch run as CPU fibers, one per
GPU thread, and cuBLAS replaced by a column-major reference that checks
its arguments as cuBLAS does. The ops it registers
(``torch.ops.rnnfast_simt.*``, the same schemas as ``torch.ops.rnnfast.*``)
must agree with the CPU ops on every output and gradient, on emulated
machines that take each path of the kernels: thread-block clusters
(Hopper), 512-thread rows (before Hopper), grids smaller than the work
(every grid-stride loop), and threads run first-to-last or last-to-first
(a result that depends on their interleaving differs between the two).

Uninitialised tensors and shared memory start as NaN (initcheck's
stand-in), and the last test reruns the others under AddressSanitizer
(memcheck's). What this cannot show is listed at the top of
simt_emulation.h (races between truly parallel threads, the device's own
math, speed); scripts/gpu_check.sh on a GPU has the last word. Building the
emulation takes about 25 s, and about 40 s more with AddressSanitizer
(build/rnnfast_simt*, rebuilt by ninja when a source or header changes).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import simt_emulation
from simt_emulation import ASAN_ENV, ROOT
from utils import backward_op_args, make_op_args, zoneout_masks

# Emulated machines: (sms, max_cluster, max_blocks).
H200 = (132, 4, 65535)          # clusters of up to 4 blocks for short batches
PRE_HOPPER = (108, 1, 65535)    # one block per row, up to 512 threads
TINY_GRID = (132, 4, 1)         # one block (or cluster) per grid: every kernel loops


@pytest.fixture(scope="session")
def simt():
    """The emulated CUDA backend (simt_emulation.load())."""
    module = simt_emulation.load()
    yield module
    module.configure()


@pytest.fixture
def machine(simt, request):
    """Sets the emulated machine for one test, then restores the default.
    Meanwhile every tensor torch allocates uninitialised (at::empty: the
    backends' workspaces and outputs) is filled with NaN, so a kernel that
    reads memory nothing wrote shows it in its results, as
    compute-sanitizer's initcheck would on a GPU."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    def configure(sms_cluster_blocks, reverse_order=False, fused_step_rows=8):
        sms, max_cluster, max_blocks = sms_cluster_blocks
        simt.configure(sms=sms, max_cluster=max_cluster, max_blocks=max_blocks,
                       reverse_order=reverse_order, fused_step_rows=fused_step_rows)
        simt.reset_counters()
    configure(H200)
    yield configure
    simt.configure()
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _simt_op(name):
    return getattr(torch.ops.rnnfast_simt, name).default


def _both(cell, sample, *, zoneout=None, mask=None, seed=5):
    """Forward (and, in training, backward) of ``sample`` through the CPU op
    and the emulated CUDA op: ``[(name, cpu result, emulated result)]``."""
    zoneout = zoneout or {}
    fwd = [cell.forward, _simt_op(cell.forward_op)]
    saved = [f(*sample.args, **zoneout) for f in fwd]
    names = [a.name for a in cell.forward._schema.returns]
    pairs = [(n, a, b) for n, a, b in zip(names, *saved)]
    if not sample.training:
        return pairs
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t) for t in saved[0][:3]]
    kwargs = dict(zoneout)
    if zoneout:
        kwargs["cell_states"] = None  # per backend, below
    if mask is not None:
        kwargs["output_mask"] = mask
    results = []
    for op, s in zip([cell.backward, _simt_op(cell.backward_op)], saved):
        if zoneout:
            kwargs["cell_states"] = s[-1]
        results.append(op(*backward_op_args(cell, sample, grads, s), **kwargs))
    names = [a.name for a in cell.backward._schema.returns]
    return pairs + [(n, a, b) for n, a, b in zip(names, *results)]


def _assert_agree(pairs, atol=1e-12, rtol=1e-10, scaled=False):
    """Every pair equal within the tolerance; with ``scaled``, ``atol`` is
    relative to the largest magnitude of the CPU's tensor (at least 1)."""
    for name, cpu, emulated in pairs:
        assert cpu.shape == emulated.shape and cpu.dtype == emulated.dtype, name
        a = atol * max(1.0, cpu.abs().max().item()) if scaled and cpu.numel() else atol
        torch.testing.assert_close(emulated, cpu, atol=a, rtol=rtol,
                                   msg=lambda m, k=name: f"{k}: {m}")


def _cell_sample(cell, **kwargs):
    return make_op_args(layer_norm=cell.layer_norm, **kwargs)


# ---- the emulation itself ------------------------------------------------------

def test_emulated_warp_shuffle_sums_each_warp(simt):
    values = [float(i) for i in range(128)]
    sums = simt.warp_sums(values)
    for t in range(128):
        w = t // 32
        assert sums[t] == sum(values[32 * w:32 * w + 32])


@pytest.mark.parametrize("reverse_order", [False, True])
def test_emulated_shared_memory_is_per_block_and_synchronised(simt, reverse_order):
    simt.configure(reverse_order=reverse_order)
    try:
        out = simt.neighbours(3, True)
        for b in range(3):
            for t in range(256):
                assert out[b * 256 + t] == b * 1000 + (t - 1) % 256
        # Without the barrier a thread may read its neighbour's slot before
        # it is written: the slot's 0xff bytes (NaN) show it.
        unsynchronised = simt.neighbours(1, False)
        assert any(v != v for v in unsynchronised)
    finally:
        simt.configure()


def test_emulated_divergent_barrier_is_an_error(simt):
    with pytest.raises(RuntimeError, match="__syncthreads that not every thread reaches"):
        simt.divergent_barrier()


def test_emulated_cluster_reads_every_blocks_shared_memory(simt):
    assert simt.cluster_sums(8, 4) == [1.0 + 2.0 + 3.0 + 4.0] * (8 * 64)
    assert simt.cluster_sums(2, 1) == [1.0] * (2 * 64)
    with pytest.raises(RuntimeError, match="a cluster of 4 blocks for a grid of 6"):
        simt.cluster_sums(6, 4)


# ---- the CUDA backend against the CPU backend ------------------------------------

@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "gemm-step"])
def test_agrees_with_cpu_on_every_sample(cell, simt, machine, fused):
    """Padded and packed input, with and without biases (and projection),
    both directions, training and inference: every output and gradient;
    the LSTM's forward steps (all of at most 8 rows here) with the product
    in the step kernel (lstm_fused_forward_step) and through cuBLAS."""
    machine(H200, fused_step_rows=8 if fused else 0)
    for sample in cell.sample_inputs("cpu"):
        _assert_agree(_both(cell, sample))


@pytest.mark.parametrize("mode", ["mask", "rate"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_agrees_with_cpu_with_zoneout(cell, simt, machine, mode, layout):
    sample = _cell_sample(cell, steps=4, batch=3, input_size=3, hidden=5, seed=3,
                          lengths=[4, 3, 3, 1] if layout == "packed" else None,
                          proj=2 if cell.has_projection and layout == "packed" else 0,
                          training=mode == "mask")
    if mode == "mask":
        mask_h, mask_c = zoneout_masks(sample, 0.3, 0.4)
        zoneout = dict(zoneout_hidden_mask=mask_h, zoneout_cell_mask=mask_c)
    else:
        zoneout = dict(zoneout_hidden=0.3, zoneout_cell=0.4)
    _assert_agree(_both(cell, sample, zoneout=zoneout))


# Each emulated machine with sizes that take its path: short batches and
# H = 600 (clusters of 4 blocks of 160 threads on the H200, one 512-thread
# block a row before Hopper, every LayerNorm row looping over its units);
# LSTM rows wider than one block (H = 300); and a grid of one block.
MACHINES = {"h200": H200, "pre-hopper": PRE_HOPPER, "tiny-grid": TINY_GRID}


@pytest.mark.parametrize("machine_name", list(MACHINES))
def test_agrees_with_cpu_on_each_machines_path(cell, simt, machine, machine_name):
    machine(MACHINES[machine_name])
    hidden = 600 if cell.layer_norm else 300
    sample = _cell_sample(cell, steps=2, batch=3, input_size=4, hidden=hidden,
                          lengths=[2, 2, 1], seed=9)
    _assert_agree(_both(cell, sample))
    counts = simt.counters()
    assert counts["launches"] > 0 and counts["gemms"] > 0
    if cell.layer_norm and machine_name == "h200":
        assert counts["largest_cluster"] == 4, counts
    if machine_name == "pre-hopper":
        assert counts["cluster_launches"] == 0, counts


def test_tiny_grid_loops_over_every_row(cell, simt, machine):
    """More rows than the grid has blocks: every kernel's grid-stride loop,
    the LayerNorm parameter gradients' column loop included."""
    machine(TINY_GRID)
    sample = _cell_sample(cell, steps=3, batch=9, input_size=3, hidden=40, seed=10)
    _assert_agree(_both(cell, sample))
    mask_h, mask_c = zoneout_masks(sample, 0.2, 0.3, seed=2)
    _assert_agree(_both(cell, sample, zoneout=dict(zoneout_hidden_mask=mask_h,
                                                   zoneout_cell_mask=mask_c)))


@pytest.mark.parametrize("machine_name", list(MACHINES))
def test_results_do_not_depend_on_thread_order(cell, simt, machine, machine_name):
    """The lowest-numbered threads run ahead as far as the barriers let
    them, then the highest: the same bits, so no kernel reads what another
    thread writes (or overwrites what it still reads) without a barrier
    between them."""
    sample = _cell_sample(cell, steps=3, batch=3, input_size=3,
                          hidden=600 if cell.layer_norm else 300,
                          lengths=[3, 2, 1], seed=11)
    machine(MACHINES[machine_name])
    first = _both(cell, sample)
    machine(MACHINES[machine_name], reverse_order=True)
    second = _both(cell, sample)
    for (name, _, a), (_, _, b) in zip(first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "gemm-step"])
@pytest.mark.parametrize("hidden", [32, 600])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_native_half_types_agree_with_cpu(cell, simt, machine, dtype, hidden, fused, training):
    """Half types run natively on CUDA (half GEMM operands, float
    accumulation, states in float), upcast on the CPU: equal within a few
    units of the half type's rounding of each tensor's largest value. In
    evaluation too, where the forward steps save nothing (the
    LayerNorm-LSTM's still normalises its products in place: with h in a
    half type it reads them again for o)."""
    sample = _cell_sample(cell, steps=5 if hidden < 100 else 2, batch=4, input_size=8,
                          hidden=hidden, seed=12, dtype=dtype, training=training)
    if cell.layer_norm and not fused:
        pytest.skip("the LayerNorm-LSTM has no fused step")
    machine(H200, fused_step_rows=8 if fused else 0)
    eps = torch.finfo(dtype).eps
    _assert_agree(_both(cell, sample), atol=8 * eps, rtol=8 * eps, scaled=True)


def test_output_mask_agrees_with_cpu(cell, simt, machine):
    """A backward asked for the input gradient alone (a frozen layer)."""
    sample = _cell_sample(cell, steps=3, batch=3, input_size=3, hidden=6, seed=13)
    n = len(cell.backward._schema.returns)
    mask = [True] + [False] * (n - 1)
    _assert_agree(_both(cell, sample, mask=mask))


# ---- compute-sanitizer memcheck's stand-in ---------------------------------------

def test_emulated_backend_under_address_sanitizer(tmp_path):
    """The tests above again, in a Python under AddressSanitizer with the
    emulation built with -fsanitize=address: a read or write past any
    tensor, or past a block's shared object, by a kernel or the drivers is
    an error naming the kernel (what memcheck would report on a GPU). A
    kernel that reads one row past its last, for instance, passes the
    parity tests (the values past the end are not used) and fails here."""
    if os.environ.get(ASAN_ENV):
        pytest.skip("already under AddressSanitizer")
    cxx = os.environ.get("CXX", "c++")
    runtime = []
    for lib in ("libasan.so", "libstdc++.so"):
        found = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True,
                               text=True).stdout.strip()
        if not os.path.isabs(found) or not os.path.exists(found):
            pytest.skip(f"{cxx} has no {lib}")
        runtime.append(found)
    env = dict(os.environ, LD_PRELOAD=" ".join(runtime), **{ASAN_ENV: "1"},
               ASAN_OPTIONS=f"detect_leaks=0:log_path={tmp_path / 'asan'}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
         # (thread order is not what this run checks)
         "-k", "not address_sanitizer and not emulated_cuda_backend and not thread_order"],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    reports = "".join(p.read_text() for p in sorted(tmp_path.glob("asan*"))
                      if "ERROR: AddressSanitizer" in p.read_text())
    assert result.returncode == 0 and not reports, (
        f"exit {result.returncode}\n{reports[-6000:]}\n{result.stdout[-3000:]}"
        f"\n{result.stderr[-2000:]}")


# ---- the CPU tests, on the CUDA backend ------------------------------------------

# The shared cell tests and those of each cell, the regularisers and the
# output masks, with rnnfast's CPU ops routed through the emulated CUDA
# backend (conftest.py); left out for time are those that repeat an op many
# times on one case (gradcheck: the ops' gradients are the CPU's to 1e-12
# above, and the CPU's are gradchecked; bitwise determinism across CPU
# thread counts; backward split over gradient blocks, a CPU cache size; the
# compile tests).
ROUTED_FILES = ["test_cells.py", "test_lstm.py", "test_layer_norm_lstm.py",
                "test_regularisers.py", "test_output_mask.py"]
ROUTED_SKIP = ("not gradcheck and not bitwise_deterministic and not several_gradient_blocks"
               " and not compile and not larger_hidden"
               # on a machine with a GPU: its tests run on the device, in the
               # suite itself, not again here
               " and not cuda")


def test_cpu_suite_passes_on_the_emulated_cuda_backend():
    """nn.LSTM and reference parity over the parametrised grids (layers,
    directions, projection, batch_first, PackedSequence, given states,
    float32 and float64), the 2x-of-PyTorch's-error rule in bfloat16 and
    float16 (native half GEMMs on this backend), zoneout, DropConnect,
    variational dropout, output masks, bad input: the CPU suite, every op
    call run by the CUDA backend's code."""
    if os.environ.get(simt_emulation.ROUTE_ENV) or os.environ.get(ASAN_ENV):
        pytest.skip("already routed")
    simt_emulation.load()  # build here, so a build error shows as this test's
    env = dict(os.environ, **{simt_emulation.ROUTE_ENV: "1"})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", ROUTED_SKIP,
         *[str(ROOT / "tests" / f) for f in ROUTED_FILES]],
        env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize("batch", [1, 8, 9])
def test_fused_step_takes_steps_of_at_most_8_rows(simt, machine, batch):
    """An LSTM inference forward of T steps runs T cuBLAS products where a
    step has more rows than kFusedStepRows, none where it has fewer (the
    input projection is ATen's addmm, not counted), with the same result."""
    sample = make_op_args(steps=4, batch=batch, input_size=5, hidden=40, training=False,
                          seed=14)
    expected = torch.ops.rnnfast.lstm_forward(*sample.args)
    got = _simt_op("lstm_forward")(*sample.args)
    for name, e, g in zip(("output", "hy", "cy"), expected, got):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10, msg=lambda m, k=name: k + m)
    assert simt.counters()["gemms"] == (0 if batch <= 8 else 4)
