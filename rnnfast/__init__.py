"""rnnfast: fused LSTM and LayerNorm-LSTM kernels for PyTorch; rnnfast.LSTM is
a drop-in torch.nn.LSTM."""

from __future__ import annotations

from . import functional, ops
from ._C import build_info as _build_info
from .modules import LSTM, LayerNormLSTM

__version__ = "0.1.0"
__all__ = ["LSTM", "LayerNormLSTM", "functional", "ops", "build_info", "__version__"]


def build_info() -> dict:
    """How the extension was built: ``with_cuda``, ``cuda_archs``,
    ``torch_version`` (built against), and the CPU kernels and GEMM in use."""
    info = dict(_build_info())
    info["rnnfast_version"] = __version__
    return info
