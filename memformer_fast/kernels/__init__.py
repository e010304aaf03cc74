"""Fused Triton kernels of the three Memformer operations: ``memformer_fast.kernels``.

One module per operation, each with its ``*_kernel`` Triton functions and the host launchers
``<op>_fwd`` / ``<op>_bwd`` that take PyTorch tensors of any strides (and ``wrap``, applied to each
kernel before its launch: :func:`launch_traceable` inside a ``torch.library.triton_op``). Autograd
and the ops live in :mod:`memformer_fast.ops`; the reference every kernel is tested against is
:mod:`memformer_fast.reference`.

Where the modules are: their sources are the repository's top-level ``kernels/`` folder, which has
no ``__init__.py`` on purpose. Python run from the repository root finds that folder as
``kernels``; a regular package there would shadow any installed distribution of that name (Hugging
Face's ``kernels``, which ``transformers`` imports), while a folder without one is at most a portion
of a namespace package, which the import system passes over for a regular package or module found
anywhere on ``sys.path``. This file is the package's ``__init__`` instead: a wheel holds the modules
beside it (``setup.py``'s ``build_py`` copies them here); in a source checkout, and so in an
editable install, which imports from it, ``__path__`` reaches into ``kernels/``. (A namespace
``memformer_fast.kernels`` mapped onto ``kernels/`` by ``package_dir`` would need no file here,
but setuptools' editable finder cannot import such a package: pypa/setuptools#4943.)
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCES = _HERE.parent.parent / "kernels"  # the checkout's kernels/, when this file is in one
if not (_HERE / "memory_read.py").is_file() and (_SOURCES.parent / "setup.py").is_file():
    __path__.append(str(_SOURCES))

from . import gated_update, memory_read, memory_write  # noqa: E402  (once __path__ is complete)
from .gated_update import gated_update_bwd, gated_update_fwd  # noqa: E402
from .memory_read import memory_read_bwd, memory_read_fwd  # noqa: E402
from .memory_write import memory_write_bwd, memory_write_fwd  # noqa: E402
from .utils import launch_directly, launch_traceable  # noqa: E402

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
