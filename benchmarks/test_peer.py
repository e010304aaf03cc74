"""Against a peer: lucidrains' ``memformer`` (PyPI 0.3.1) and its ``memory_replay_backprop``.

Both models at one configuration (width, heads, feed-forward width, encoder and decoder depth,
memory slots, segment length, vocabulary: CUDA the paper's size, batch 8; CPU ``cpu-small``, batch
4), one MRBP training step over a rollout of T = 4 segments (and 16 in the full set):

- ``peer-mrbp``: the peer's MRBP, which scores only the last segment (its only mode);
- ``mrbp-last``: ours on the same task (only the last segment scored: the decoder runs once);
- ``mrbp``: ours on its own objective (every segment after the first predicted).

Time per rollout, tokens per second (tokens read by the encoder) and peak memory (see
:mod:`harness`). Where the two models differ: the README's "Peer" section. When the peer is not
installed (``pip install --no-deps memformer==0.3.1 einops``) its cases are skipped, and the
header and the end of the run say so.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
from harness import (
    DEVICE,
    ON_CUDA,
    PEER_INSTALL,
    full_set,
    peak_memory_info,
    rounds,
    run_benchmark,
)
from workloads import SIZES, RolloutCase, build, parameter_count

SIZE, BATCH = ("paper", 8) if ON_CUDA else ("cpu-small", 4)
SEGMENTS = (4, 16) if full_set() else (4,)
METHODS = ("peer-mrbp", "mrbp-last", "mrbp")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("segments", SEGMENTS, ids=lambda t: f"T{t}")
def test_peer(benchmark: Any, segments: int, method: str) -> None:
    if method == "peer-mrbp":
        pytest.importorskip("memformer", reason=f"the peer is not installed: {PEER_INSTALL}")
    benchmark.group = f"peer {SIZE} T={segments}"
    case = RolloutCase(SIZE, method, segments, BATCH)
    model, step = build(case, DEVICE)
    info: dict[str, object] = {
        "suite": "peer",
        "method": case.method,
        "implementation": "memformer " + importlib.metadata.version("memformer")
        if method == "peer-mrbp"
        else "memformer_fast",
        "segments": segments,
        "size": SIZE,
        "config": SIZES[SIZE],
        "parameters": parameter_count(model),
        "batch": BATCH,
        "tokens_per_rollout": case.tokens,
    }
    info.update(peak_memory_info(case.spec(), model, step))
    median = run_benchmark(
        benchmark, step, info, timed_rounds=rounds(cpu=2, cuda=5), warmup_rounds=1
    )
    benchmark.extra_info["tokens_per_s"] = case.tokens / median
