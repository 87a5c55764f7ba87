"""What the built extension registers: every rnnfast op has a CPU kernel, a
fake (Meta) kernel, and, in a CUDA build, a CUDA kernel. The ops are
enumerated from the dispatcher, so ops added later are covered."""

from __future__ import annotations

import pytest
import torch

import rnnfast

KNOWN_OPS = {"rnnfast::lstm_forward", "rnnfast::lstm_backward",
             "rnnfast::layer_norm_lstm_forward", "rnnfast::layer_norm_lstm_backward"}
# The int8 inference ops (rnnfast.quantized) are CPU kernels by design, and
# the CPU's mask generator (CUDA draws its masks with torch.randint).
CPU_ONLY_OPS = {"rnnfast::quantized_pack_weight", "rnnfast::quantized_lstm_forward",
                "rnnfast::quantized_layer_norm_lstm_forward", "rnnfast::quantized_lstm_stack",
                "rnnfast::quantized_layer_norm_lstm_stack", "rnnfast::quantized_linear",
                "rnnfast::bernoulli_masks"}


def _rnnfast_ops() -> list[str]:
    return sorted(name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("rnnfast::"))


def test_ops_are_registered():
    ops = _rnnfast_ops()
    assert KNOWN_OPS <= set(ops), ops
    for name in ops:  # reachable from Python as torch.ops.rnnfast.<op>
        assert hasattr(torch.ops.rnnfast, name.split("::", 1)[1]), name


@pytest.mark.parametrize("key", ["CPU", "Meta"])
def test_every_op_has_a_kernel_for(key):
    missing = [op for op in _rnnfast_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    assert not missing, f"ops without a {key} kernel: {missing}"


def test_cuda_build_registers_every_op_for_cuda():
    if not rnnfast.build_info()["with_cuda"]:
        pytest.skip("rnnfast was built without CUDA (build_info()['with_cuda'] is False)")
    assert CPU_ONLY_OPS <= set(_rnnfast_ops())
    missing = [op for op in _rnnfast_ops() if op not in CPU_ONLY_OPS
               and not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not missing, f"a CUDA build without CUDA kernels for: {missing}"


def test_no_cuda_kernels_claimed_without_cuda():
    """build_info must not say with_cuda=False while CUDA kernels exist
    (or the reverse, covered above)."""
    if rnnfast.build_info()["with_cuda"]:
        pytest.skip("CUDA build")
    registered = [op for op in _rnnfast_ops()
                  if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    assert not registered, registered


@pytest.mark.parametrize("op", ["rnnfast::lstm_forward", "rnnfast::layer_norm_lstm_forward"])
def test_forward_op_has_autograd(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
