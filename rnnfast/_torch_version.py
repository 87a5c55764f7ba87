"""The oldest torch rnnfast runs on, checked when it is built (setup.py
loads this file by its path) and when it is imported.

pip checks pyproject's ``torch>=2.8`` only with its dependency resolution on;
the README's build command (``--no-build-isolation --no-deps``) skips it, and
an older torch then built the extension for minutes and failed at import on
an AttributeError. This file imports nothing but the standard library.
"""

from __future__ import annotations

import re

# The oldest release the whole suite was run on and passes: torch 2.8.0
# (one test skipped: a fullgraph compile that needs Dynamo to capture
# Tensor.item()). torch 2.5.1 runs the LSTMs but fails ONNX export,
# torch.export of the regularisers, compile of packed input and of
# rnnfast.quantized, and vmap; torch 2.4.1 has no torch.library.register_vmap
# and fails at import.
MIN_TORCH = (2, 8)


def torch_release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``"2.14.1+cu130"``
    or ``"2.6.0a0+git1234"``."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"rnnfast: cannot read the torch version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch(version: str) -> None:
    """Raises ImportError, saying what is needed, when ``version`` is older
    than MIN_TORCH."""
    if torch_release(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"rnnfast needs torch >= {need}, found torch {version}; "
                          f"upgrade torch (pip install 'torch>={need}') and rebuild rnnfast")
