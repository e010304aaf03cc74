"""Benchmark-suite setup: which set runs, thread count, the peer, and the machine description
written into the JSON.

``pytest benchmarks/ --benchmark-only`` collects the ``test_*.py`` files here; the root
``pytest -q`` never does (``testpaths = ["tests"]``). By default it runs the quick set;
``--benchmark-long`` (or ``MEMFORMER_BENCH_FULL=1``) runs the full one.
"""

from __future__ import annotations

import os
import platform
import shlex
from typing import Any

import pytest
import torch
from harness import (
    FULL_ENV,
    ON_CUDA,
    PEER_INSTALL,
    THREADS_ENV,
    apply_thread_setting,
    device_name,
    full_set,
    installed_version,
)

apply_thread_setting()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark-long",
        action="store_true",
        help=f"run the full benchmark set (the same as {FULL_ENV}=1): compiled references, "
        "the longest rollouts and the peer at T = 16 too; default: the quick set",
    )


def pytest_configure(config: pytest.Config) -> None:
    # The test modules choose their cases when they are imported, after this hook: the
    # environment carries the choice to them (and to the memory probe's processes).
    if config.getoption("--benchmark-long"):
        os.environ[FULL_ENV] = "1"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which set runs and whether the peer is there, before anything is timed."""
    which = (
        "full set" if full_set() else f"quick set (--benchmark-long or {FULL_ENV}=1: the full set)"
    )
    peer = installed_version("memformer")
    return [
        f"memformer_fast benchmarks: the {which}",
        f"peer: memformer {peer}"
        if peer
        else f"peer: NOT INSTALLED, its cases will be skipped ({PEER_INSTALL})",
    ]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat, at the end, that the peer was not measured when its cases were skipped."""
    skipped = [
        report
        for report in terminalreporter.stats.get("skipped", [])
        if "test_peer.py" in report.nodeid
    ]
    if skipped:
        terminalreporter.write_sep("=", "peer not measured", yellow=True)
        terminalreporter.write_line(
            f"lucidrains' memformer 0.3.1 is not installed: {len(skipped)} peer case(s) skipped. "
            f"Install it with `{PEER_INSTALL}` (it leaves torch alone) and run again."
        )


# Optional: without pytest-benchmark the suite still collects (``--collect-only``); running it
# needs the plugin's ``benchmark`` fixture.
@pytest.hookimpl(optionalhook=True)
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
        "triton": installed_version("triton"),
        "memformer_fast": installed_version("memformer_fast"),
        "peer_memformer": installed_version("memformer"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "full_set": full_set(),
        "command": (f"{THREADS_ENV}={threads} " if threads else "")
        + (f"{FULL_ENV}=1 " if full_set() and "--benchmark-long" not in command else "")
        + command,
    }
