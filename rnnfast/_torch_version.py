"""The oldest torch rnnfast runs on, checked when it is built (setup.py
loads this file by its path) and when it is imported; and what to say when
the compiled extension was built against another torch than the one it
meets.

pip checks pyproject's ``torch>=2.8`` only with its dependency resolution on;
the README's build command (``--no-build-isolation --no-deps``) skips it, and
an older torch then built the extension for minutes and failed at import on
an AttributeError. This file imports nothing but the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

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


# csrc/rnnfast.cpp keeps this marker, followed by the torch version it was
# compiled against, in the library.
_BUILT_AGAINST = re.compile(rb"rnnfast-built-against-torch=([0-9A-Za-z.+_-]+)")
_REBUILD = ("rebuild it against this torch: in rnnfast's source tree (or unpacked sdist), "
            "pip install --no-build-isolation --no-deps . (-e . for an editable install; "
            "build isolation off, so that it compiles against the installed torch)")


def built_against(library: Path) -> Optional[str]:
    """The torch version the rnnfast library file ``library`` was compiled
    against, read from its marker; None when there is none to read."""
    try:
        match = _BUILT_AGAINST.search(Path(library).read_bytes())
    except OSError:
        return None
    return match.group(1).decode() if match else None


def load_error(error: ImportError, running: str, package: Path) -> ImportError:
    """The ImportError to raise when ``rnnfast._C`` (in the folder
    ``package``) failed to load under torch ``running``: one naming both
    torch versions and the rebuild where the library was built against
    another torch (its undefined symbols or missing CUDA libraries say only
    that), else ``error`` itself."""
    built = next((b for b in map(built_against, sorted(Path(package).glob("_C*.so")))
                  if b is not None), None)
    if built is None or built == running:
        return error
    return ImportError(f"rnnfast's compiled extension was built against torch {built} and "
                       f"cannot load with the installed torch {running} ({error}); {_REBUILD}")


def mismatch_warning(built: str, running: str) -> Optional[str]:
    """What to warn when the extension loaded, but was built against another
    torch release (major.minor) than ``running``: torch's C++ ABI is not kept
    across releases, so it may crash or misbehave. None when they match."""
    if torch_release(built) == torch_release(running):
        return None
    return (f"rnnfast's compiled extension was built against torch {built} and runs with "
            f"torch {running}; {_REBUILD}")
