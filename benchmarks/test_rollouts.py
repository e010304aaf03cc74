"""MRBP against full BPTT and segment-level checkpointing: time and peak memory per rollout.

``test_rollout``: the encoder-decoder model over T in {4, 16} segments, and 64 in the full set
(CUDA: the paper's size, batch 8, MRBP with the replay buffer offloaded to pinned host memory, and
T = 256 in the full set; CPU: ``cpu-small``, batch 2). ``test_table3``: the paper's Table 3
setting, a 12-layer "decoder" Memformer (d_model 512, 8 heads, 32 slots) over a horizon of 4
segments, batch 16 (CPU: ``cpu-decoder4``, 4 layers of width 128); the paper reports BPTT
16,177 MB x1.00, checkpointing 9,885 MB x0.48, MRBP 7,229 MB x0.90 (speed relative to BPTT).
``benchmarks/report.py`` turns the cases of one run into ratios to BPTT.

Peak memory (``extra_info["peak_mb"]``) is what one step adds over the model and its inputs: see
:mod:`harness` for how it is measured on each device.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import DEVICE, ON_CUDA, full_set, peak_memory_info, rounds, run_benchmark
from workloads import SIZES, RolloutCase, build, parameter_count

METHODS = ("bptt", "checkpoint", "mrbp")
# T = 64 (the longest, and BPTT's and checkpointing's largest memory) in the full set only.
SEGMENTS = (4, 16, 64) if full_set() else (4, 16)
# On CUDA: MRBP with an offloaded replay buffer, and in the full set T = 256 for the two MRBP
# variants only (BPTT and checkpointing hold O(T) state there).
ROLLOUT_CASES = [(t, m) for t in SEGMENTS for m in METHODS]
if ON_CUDA:
    ROLLOUT_CASES += [(t, "mrbp-offload") for t in SEGMENTS]
if ON_CUDA and full_set():
    ROLLOUT_CASES += [(256, "mrbp"), (256, "mrbp-offload")]
ROLLOUT_SIZE, ROLLOUT_BATCH = ("paper", 8) if ON_CUDA else ("cpu-small", 2)
TABLE3_SIZE, TABLE3_BATCH = ("paper-decoder12", 16) if ON_CUDA else ("cpu-decoder4", 4)
PAPER_TABLE3 = {  # peak MB and speed relative to BPTT, as the paper reports them
    "bptt": (16177, 1.00),
    "checkpoint": (9885, 0.48),
    "mrbp": (7229, 0.90),
}


def _measure(benchmark: Any, case: RolloutCase, suite: str, extra: dict[str, object]) -> None:
    """Peak memory of one step, then its time over several rounds."""
    model, step = build(case, DEVICE)
    info: dict[str, object] = {
        "suite": suite,
        "method": case.method,
        "segments": case.segments,
        "size": case.size,
        "config": SIZES[case.size],
        "parameters": parameter_count(model),
        "batch": case.batch_size,
        "tokens_per_rollout": case.tokens,
        **extra,
    }
    info.update(peak_memory_info(case.spec(), model, step))
    median = run_benchmark(
        benchmark, step, info, timed_rounds=rounds(cpu=2, cuda=5), warmup_rounds=1
    )
    benchmark.extra_info["tokens_per_s"] = case.tokens / median


@pytest.mark.parametrize(("segments", "method"), ROLLOUT_CASES, ids=lambda c: str(c))
def test_rollout(benchmark: Any, segments: int, method: str) -> None:
    benchmark.group = f"rollout {ROLLOUT_SIZE} T={segments}"
    case = RolloutCase(ROLLOUT_SIZE, method, segments, ROLLOUT_BATCH)
    _measure(benchmark, case, "rollout", {})


@pytest.mark.parametrize("method", METHODS)
def test_table3(benchmark: Any, method: str) -> None:
    benchmark.group = f"table3 {TABLE3_SIZE} T=4"
    case = RolloutCase(TABLE3_SIZE, method, 4, TABLE3_BATCH)
    paper_mb, paper_speed = PAPER_TABLE3[method]
    _measure(benchmark, case, "table3", {"paper_mb": paper_mb, "paper_speed": paper_speed})
