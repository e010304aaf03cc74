"""Fused Triton kernels of the three Memformer operations (installed as ``memformer_fast.kernels``).

One module per operation, each with its ``*_kernel`` Triton functions and the host launchers
``<op>_fwd`` / ``<op>_bwd`` that take PyTorch tensors of any strides. Autograd and the custom ops
live in :mod:`memformer_fast.ops`; the reference every kernel is tested against is
:mod:`memformer_fast.reference`.
"""

from .gated_update import gated_update_bwd, gated_update_fwd
from .memory_read import memory_read_bwd, memory_read_fwd
from .memory_write import memory_write_bwd, memory_write_fwd

__all__ = [
    "gated_update_bwd",
    "gated_update_fwd",
    "memory_read_bwd",
    "memory_read_fwd",
    "memory_write_bwd",
    "memory_write_fwd",
]
