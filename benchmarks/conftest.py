"""Benchmark-suite setup: thread count, and the machine description written into the JSON.

``pytest benchmarks/ --benchmark-only`` collects the ``test_*.py`` files here; the root
``pytest -q`` never does (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
from typing import Any

import pytest
import torch
from harness import ON_CUDA, THREADS_ENV, apply_thread_setting, device_name

apply_thread_setting()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """Record the device, the library versions and the exact command in the benchmark JSON."""
    threads = os.environ.get(THREADS_ENV)
    command = "pytest " + shlex.join(config.invocation_params.args)
    machine_info["memformer_bench"] = {
        "device": device_name(),
        "device_type": "cuda" if ON_CUDA else "cpu",
        "cuda": torch.version.cuda if ON_CUDA else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "memformer_fast": _version("memformer_fast"),
        "peer_memformer": _version("memformer"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "command": (f"{THREADS_ENV}={threads} " if threads else "") + command,
    }
