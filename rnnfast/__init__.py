"""rnnfast: fused LSTM and LayerNorm-LSTM kernels for PyTorch; rnnfast.LSTM is
a drop-in torch.nn.LSTM."""

from __future__ import annotations

import torch as _torch

from ._torch_version import check_torch as _check_torch

_check_torch(_torch.__version__)  # before anything that needs a newer torch

from . import _export  # noqa: F401  (ONNX export and torch.jit.trace support)
from . import functional, ops
from ._C import build_info as _build_info
from ._C import empty_cache as _empty_cache
from .modules import LSTM, LayerNormLSTM
from . import quantized  # noqa: E402  (after modules: it builds on them)
from .quantized import quantize_dynamic

__version__ = "0.1.0"
__all__ = ["LSTM", "LayerNormLSTM", "functional", "ops", "quantized", "quantize_dynamic",
           "build_info", "empty_cache", "__version__"]


def build_info() -> dict:
    """How the extension was built: ``with_cuda``, ``cuda_archs``,
    ``torch_version`` (built against), and the CPU kernels and GEMM in use
    (``cpu_int8_kernels``: ``"AMX-INT8+AVX512-VNNI"`` (AMX for products of 4
    rows or more, VNNI for fewer), ``"AVX512-VNNI"``, ``"AVX2"`` or
    ``"portable"``, those of :mod:`rnnfast.quantized`; ``cpu_native_bfloat16``:
    whether a bfloat16 op runs its GEMMs in bfloat16 on this CPU, else in
    float32, and ``cpu_bf16_step_gemm``: what runs its per-step products,
    ``"rnnfast-AMX-BF16"``, ``"mkl-bf16"`` or ``"none"``; ``cpu_step_gemm``:
    the product measured fastest for each small-batch step shape run so far;
    ``cpu_bulk_gemm``: what runs the float32 products over many rows (the
    input projection, the backward's input and weight gradients), ``{"chosen":
    "onednn" or cpu_gemm's name, or None before the first such product,
    "blas_us", "onednn_us": the times measured (0 if none), "why"}``;
    ``cpu_step_teams``: ``{threads: count}`` of the CPU time loops so far
    that split their steps over a team of that many threads;
    ``cpu_row_groups``: ``{groups: count}`` of those that ran their batch's
    rows in that many groups, each group's whole time loop on its own
    thread; ``cpu_one_use_products``: how many products whose weight is
    used once, such as the input and recurrent products of a one-step call,
    ran on rnnfast's own one-use products (float32, and bfloat16 on CPUs
    with AVX512-BF16) so far)."""
    info = dict(_build_info())
    info["rnnfast_version"] = __version__
    return info


def empty_cache() -> int:
    """Frees the CPU memory rnnfast keeps for reuse and returns its size in
    bytes. Training on the CPU reuses the large buffers of one step (saved
    activations, backward workspaces) in the next instead of faulting in
    fresh pages; at most ``RNNFAST_CPU_CACHE_MB`` megabytes (default 1024,
    0 turns the cache off) of free buffers are kept. The counterpart of
    ``torch.cuda.empty_cache``; GPU memory goes through torch's caching
    allocator as usual."""
    return int(_empty_cache())
