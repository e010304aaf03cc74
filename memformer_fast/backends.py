"""Where an operation can run: every probe of the environment and the kernels' limits.

The one module that :mod:`memformer_fast.functional` (backend choice), :mod:`memformer_fast.ops`
(which implementation a custom op calls) and the kernel launchers ask. It imports neither Triton
nor the kernels, so asking costs nothing where they are absent.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .config import BACKENDS

# Dtypes the fused kernels take; the reference also takes float64 (gradchecks).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (*KERNEL_DTYPES, torch.float64)
# Head dims up to 128 (padded to a power of two: 48 -> 64, 80 -> 128) are shipped and AOT-tested.
MAX_HEAD_DIM = 128
# The width of a slot is one tile of the gated update: the norm stays one in-register reduction.
MAX_GATED_WIDTH = 2048


def triton_available() -> bool:
    """Whether the Triton package can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype of every implementation: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``backend`` into ``"reference"`` or ``"triton"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package: pip install 'triton>=3.6'"
            )
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got tensors on {device}"
            )
    return backend


def select_backend(backend: str, t: Tensor, size_name: str, size: int) -> str:
    """:func:`resolve_backend`, then keep ``"auto"`` off the kernels where they do not apply
    (float64, a ``size_name`` above the kernels' limit); an explicit ``"triton"`` there is an
    error (a ValueError, or a TypeError for the dtype). ``size_name`` is ``"D"`` (the gated
    update's width) or ``"head_dim"``."""
    resolved = resolve_backend(backend, t.device)
    if resolved != "triton":
        return resolved
    limit = MAX_GATED_WIDTH if size_name == "D" else MAX_HEAD_DIM
    if t.dtype in KERNEL_DTYPES and size <= limit:
        return resolved
    if backend == "auto":
        return "reference"
    if size > limit:
        raise ValueError(f"backend='triton' supports {size_name} <= {limit}, got {size}")
    raise TypeError(
        f"backend='triton' takes the dtypes {[str(d) for d in KERNEL_DTYPES]}, got {t.dtype}"
    )
