"""Fused Triton kernels of the three Memformer operations (installed as ``memformer_fast.kernels``).

One module per operation, each with its ``*_kernel`` Triton functions and the host launchers
``<op>_fwd`` / ``<op>_bwd`` that take PyTorch tensors of any strides (and ``wrap``, applied to each
kernel before its launch: :func:`launch_traceable` inside a ``torch.library.triton_op``). Autograd
and the ops live in :mod:`memformer_fast.ops`; the reference every kernel is tested against is
:mod:`memformer_fast.reference`.
"""

from . import gated_update, memory_read, memory_write
from .gated_update import gated_update_bwd, gated_update_fwd
from .memory_read import memory_read_bwd, memory_read_fwd
from .memory_write import memory_write_bwd, memory_write_fwd
from .utils import launch_directly, launch_traceable

# The Triton kernels each launcher launches (memformer_fast.ops hands them to torch.compile's
# caches, whose keys hash the kernels' sources).
LAUNCHED_KERNELS = {
    "memory_read_fwd": (memory_read.memory_read_fwd_kernel,),
    "memory_read_bwd": (
        memory_read.memory_read_bwd_dq_kernel,
        memory_read.memory_read_bwd_dkdv_kernel,
    ),
    "memory_write_fwd": (
        memory_write.memory_write_fwd_kernel,
        memory_write.memory_write_fwd_combine_kernel,
    ),
    "memory_write_bwd": (
        memory_write.memory_write_bwd_dq_kernel,
        memory_write.memory_write_bwd_dkdv_kernel,
    ),
    "gated_update_fwd": (gated_update.gated_update_fwd_kernel,),
    "gated_update_bwd": (gated_update.gated_update_bwd_kernel,),
}

__all__ = [
    "LAUNCHED_KERNELS",
    "gated_update_bwd",
    "gated_update_fwd",
    "launch_directly",
    "launch_traceable",
    "memory_read_bwd",
    "memory_read_fwd",
    "memory_write_bwd",
    "memory_write_fwd",
]
