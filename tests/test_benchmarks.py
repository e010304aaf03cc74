"""The benchmark suite's selection (``benchmarks/conftest.py``): a quick set by default, the full
set with ``--benchmark-long``, and a clear word about the peer. Collection only: nothing is timed.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from testing_utils import run_checked

ROOT = Path(__file__).resolve().parent.parent
FULL_ENV = "MEMFORMER_BENCH_FULL"


def collect(*args: str) -> tuple[set[str], str]:
    """The tests ``pytest benchmarks/ --collect-only`` selects (``test_op[...]`` and so on),
    and its whole output (at the default verbosity, which prints the header)."""
    env = {k: v for k, v in os.environ.items() if k != FULL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "benchmarks/"]
    result = run_checked([*command, "--collect-only", *args], timeout=300, cwd=ROOT, env=env)
    tests = set(re.findall(r"<Function (\S+)>", result.stdout))
    return tests, result.stdout


def test_the_quick_set_is_the_default_and_the_full_set_adds_to_it() -> None:
    quick, quick_out = collect()
    full, full_out = collect("--benchmark-long")
    assert quick and quick < full
    added = full - quick
    # What the full set adds: compiled references, the longest rollouts, the peer at T = 16.
    assert any("-compile-" in i for i in added) and not any("-compile-" in i for i in quick)
    assert any("test_rollout[64-" in i for i in added)
    assert any("test_peer[T16-" in i for i in added) and not any("T16" in i for i in quick)
    assert f"the quick set (--benchmark-long or {FULL_ENV}=1: the full set)" in quick_out
    assert "the full set" in full_out


def test_the_header_says_whether_the_peer_is_installed() -> None:
    import importlib.metadata

    _, out = collect()
    try:
        version = importlib.metadata.version("memformer")
    except importlib.metadata.PackageNotFoundError:
        assert "peer: NOT INSTALLED, its cases will be skipped" in out
        assert "pip install --no-deps memformer==0.3.1 einops" in out
    else:
        assert f"peer: memformer {version}" in out
