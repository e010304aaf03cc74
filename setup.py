"""Build script: the Python package, the Triton kernels (``kernels/`` installed as
``memformer_fast.kernels``) and the replay-buffer extension ``memformer_fast._C``.

Build with ``pip install --no-build-isolation -e .`` (torch must already be installed). The
extension is a ``CUDAExtension`` where CUDA is present (torch built with CUDA, and a GPU or a CUDA
toolkit visible) or when ``FORCE_CUDA=1``, and a ``CppExtension`` otherwise. Compilation runs with
ninja; ``MAX_JOBS`` caps its parallel jobs and ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default ``8.0;9.0``), both read by ``torch.utils.cpp_extension``.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - depends on the build environment
    raise SystemExit(
        "memformer_fast builds a torch extension: install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from error

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
COMMON_SOURCES = ["csrc/replay_buffer.cpp", "csrc/bindings.cpp"]


def with_cuda() -> bool:
    """Whether to build the CUDA variant of the extension."""
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and (torch.cuda.is_available() or CUDA_HOME is not None)


def extension() -> Extension:
    """``memformer_fast._C``: CUDA sources only in the CUDA variant, a CPU stub in the other."""
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    if with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        print(f"memformer_fast: building _C with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}")
        return CUDAExtension(
            "memformer_fast._C",
            [*COMMON_SOURCES, "csrc/cuda/runtime_ops.cu"],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    print("memformer_fast: building _C without CUDA")
    return CppExtension(
        "memformer_fast._C",
        [*COMMON_SOURCES, "csrc/cuda/runtime_ops_cpu.cpp"],
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    packages=["memformer_fast", "memformer_fast.hf", "memformer_fast.kernels"],
    package_dir={"memformer_fast": "memformer_fast", "memformer_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
