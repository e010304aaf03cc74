"""Build script: the Python package, the Triton kernels (``kernels/`` installed as
``memformer_fast.kernels``) and the replay-buffer extension ``memformer_fast._C``.

``kernels/`` has no ``__init__.py``, so that from the repository root it never shadows an installed
``kernels`` distribution; the package's ``__init__`` is ``memformer_fast/kernels/__init__.py``.
``build_py`` (what a wheel holds) copies the modules of ``kernels/`` beside it; an editable install
imports them from ``kernels/`` through the package's ``__path__``.

Build with ``pip install --no-build-isolation -e .`` (torch must already be installed). The
extension is a ``CUDAExtension`` where CUDA is present (torch built with CUDA, and a GPU or a CUDA
toolkit visible) or when ``FORCE_CUDA=1``, and a ``CppExtension`` otherwise. Compilation runs with
ninja; ``MAX_JOBS`` caps its parallel jobs and ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default ``8.0;9.0``), both read by ``torch.utils.cpp_extension``.

The CUDA toolkit is the one ``CUDA_HOME`` (or ``CUDA_PATH``) names; without either, the first of
torch's guess, ``/usr/local/cuda`` and ``/usr/local/cuda-*`` whose ``lib64`` holds ``libcudart``
(torch guesses from the ``nvcc`` on ``PATH``, which may be a wrapper script outside the toolkit).
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

try:
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - depends on the build environment
    raise SystemExit(
        "memformer_fast builds a torch extension: install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from error

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
COMMON_SOURCES = ["csrc/replay_buffer.cpp", "csrc/bindings.cpp"]


def is_cuda_toolkit(root: str | None) -> bool:
    """Whether ``root`` is a CUDA toolkit: ``bin/nvcc`` and ``lib64/libcudart.so*`` (or lib/)."""
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with (see the module docstring), or None when there is none.

    A ``CUDA_HOME``/``CUDA_PATH`` that is not a toolkit is an error naming what to set.
    """
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        if not is_cuda_toolkit(given):
            raise SystemExit(
                f"memformer_fast: CUDA_HOME={given} is not a CUDA toolkit (expected bin/nvcc and "
                "lib64/libcudart.so* under it); set CUDA_HOME to the toolkit's root, for example "
                "/usr/local/cuda-13.0"
            )
        return given
    candidates = [cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((root for root in candidates if is_cuda_toolkit(root)), None)


def with_cuda() -> bool:
    """Whether to build the CUDA variant of the extension; points torch at the toolkit if so."""
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None and not forced:
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if forced:
            raise SystemExit(
                "memformer_fast: FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME to the "
                "toolkit's root (the folder with bin/nvcc and lib64/libcudart.so)"
            )
        return torch.cuda.is_available()  # torch's own guess, as before
    # torch read CUDA_HOME when it was imported: point it (and nvcc) at the toolkit found.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    return True


KERNEL_PACKAGE, KERNEL_SOURCES = "memformer_fast.kernels", "kernels"


class BuildPy(build_py):
    """``build_py`` that also puts the modules of ``kernels/`` into ``memformer_fast.kernels``."""

    def find_package_modules(self, package, package_dir):  # type: ignore[no-untyped-def]
        modules = super().find_package_modules(package, package_dir)
        if package == KERNEL_PACKAGE:
            for path in sorted(glob.glob(os.path.join(KERNEL_SOURCES, "*.py"))):
                name = os.path.splitext(os.path.basename(path))[0]
                if name == "__init__":
                    raise SystemExit(f"{path} would shadow other `kernels` packages: remove it")
                modules.append((package, name, path))
        return modules


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
    packages=[
        "memformer_fast",
        "memformer_fast.app",
        "memformer_fast.hf",
        KERNEL_PACKAGE,
    ],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
)
