"""The GPU session's one command (``benchmarks/gpu_validate.sh``) runs end to end as a dry run:
the same stages on the CPU through the Triton interpreter at tiny shapes, so the script is known
to work before a GPU sees it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from testing_utils import run_checked

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_validate_dry_run(tmp_path: Path) -> None:
    env = os.environ | {"PYTHON": sys.executable}
    script = ROOT / "benchmarks" / "gpu_validate.sh"
    run_checked(["bash", str(script), "--dry-run", str(tmp_path)], timeout=900, env=env)
    report = json.loads((tmp_path / "results.json").read_text())
    stages = {s["stage"]: s["rc"] for s in report["stages"]}
    assert stages == dict.fromkeys(
        ("env", "info", "tests", "correctness", "kernels", "compiled", "training"), 0
    )
    assert report["dry_run"] and report["command"].startswith("bash benchmarks/gpu_validate.sh")
    assert report["correctness"]["passed"] and report["correctness"]["checked"] == 3 * 15
    kernels = {r["kernel"] for r in report["kernels"]["rows"]}
    assert {"read fwd", "read fwd sdpa", "write bwd", "gated bwd"} <= kernels
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in report["kernels"]["rows"])
    compiled = report["compiled"]
    assert compiled["passed"] and [r["mode"] for r in compiled["rows"]] == ["eager", "compiled"]
    assert all(r["error_vs_eager"] < 1e-5 and r["ms_per_step"] > 0 for r in compiled["rows"])
    assert compiled["graph"]["graphs"] == 2  # forward and backward (opaque ops on the CPU)
    training = {(r["method"], r["T"]) for r in report["training"]["rows"]}
    assert training == {(m, t) for m in ("mrbp", "mrbp-offload") for t in (2, 3)}
    markdown = (tmp_path / "results.md").read_text()
    headings = ("# GPU validation", "## Correctness: passed", "## Kernels", "## The three ops")
    for heading in (*headings, "## One MRBP"):
        assert heading in markdown
