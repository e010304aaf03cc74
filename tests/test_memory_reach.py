"""``benchmarks/memory_reach.py``'s probe on an untrained model: it records the memory's updates
and reads through the layers' calls, so a refactor of those calls must not leave it blind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from memformer_fast import Memformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
memory_reach = pytest.importorskip("memory_reach")
memory_learning = pytest.importorskip("memory_learning")


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_stream_reach_traces_the_key_slot_at_every_length(arch: str) -> None:
    torch.manual_seed(0)
    config = memory_learning.build_config(arch, 16, memory_learning.TASK, {})
    model = Memformer(config).eval()
    result = memory_reach.stream_reach(model, memory_learning.TASK, [4, 5, 8], pairs=4)
    assert set(map(int, result["accuracy"])) == {4, 5, 8}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    segments = [e["segment"] for e in result["trace"]]
    assert segments == sorted(segments) and segments[-1] == 8
    first = result["trace"][0]
    assert first["key_signal"] == pytest.approx(1.0)  # normalised by the key's segment
    assert 0.0 < first["gate"] < 1.0
    assert set(map(int, result["read_on_key_slot"])) == {4, 5, 8}
