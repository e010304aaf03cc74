"""``benchmarks/memory_reach.py``'s probe on an untrained model: it records the memory's updates
and reads through the layers' calls, so a refactor of those calls must not leave it blind."""

from __future__ import annotations

import json
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


def test_saved_weights_carry_their_training_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run evaluated from saved weights reports how they were trained, and both commands."""
    weights = tmp_path / "model.pt"
    common = ["--d-model", "16", "--batch-size", "2", "--schedule", "2:2", "--eval-every", "2"]

    def run(*extra: str) -> dict:
        argv = ["memory_reach.py", *common, "--lengths", "2", "--out", str(tmp_path), *extra]
        monkeypatch.setattr(sys, "argv", argv)
        memory_reach.main()
        (result,) = tmp_path.glob("decoder_d16_*.json")
        record = json.loads(result.read_text())
        result.unlink()
        return record

    trained = run("--save-model", str(weights))
    assert json.loads(weights.with_suffix(".json").read_text())["steps"] == trained["steps"] == 2
    loaded = run("--load-model", str(weights))
    assert loaded["loaded"] == str(weights)
    assert (loaded["schedule"], loaded["lr"], loaded["steps"]) == ("2:2", trained["lr"], 2)
    assert loaded["command"].startswith(trained["command"] + "; then: ")
    assert "--load-model" in loaded["command"]
