"""``MemformerConfig.memory_noise``: Gaussian noise on every written slot, in training only (its
exact replay by MRBP is checked with dropout's in ``test_mrbp.py``)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import tiny_model

from memformer_fast import MemformerConfig


def _write(model, memory, x):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return model.writer(memory, x)


@pytest.mark.parametrize("noise", [0.05, 0.4])
def test_memory_noise_moves_each_slot_by_its_norm_in_training_only(noise: float) -> None:
    quiet = tiny_model("decoder", d_model=64, n_heads=4, n_memory_slots=16)
    noisy = tiny_model("decoder", d_model=64, n_heads=4, n_memory_slots=16, memory_noise=noise)
    noisy.load_state_dict(quiet.state_dict())
    memory = quiet.init_memory(32)
    x = torch.randn(32, 5, 64)
    clean = _write(quiet.train(), memory, x)
    torch.testing.assert_close(_write(noisy.eval(), memory, x), clean)  # none in eval
    written = _write(noisy.train(), memory, x)
    torch.testing.assert_close(written.norm(dim=-1), torch.ones(32, 16))  # still unit slots
    moved = (written - clean).norm(dim=-1)  # ~ noise for small noise (a chord of the sphere)
    assert 0.8 * noise < moved.mean() < 1.1 * noise, moved.mean()
    torch.testing.assert_close(_write(noisy, memory, x), written)  # drawn from torch's seed
    assert not torch.equal(noisy.writer(memory, x), written)


def test_memory_noise_makes_training_stochastic_and_is_validated() -> None:
    assert not MemformerConfig(vocab_size=8).stochastic
    assert MemformerConfig(vocab_size=8, memory_noise=0.1).stochastic
    assert MemformerConfig(vocab_size=8, dropout=0.1).stochastic
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"memory_noise must be a finite number >= 0, got"):
            MemformerConfig(vocab_size=8, memory_noise=bad)
