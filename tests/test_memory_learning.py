"""The memory learns from the defaults: single-key recall across 8 segments of distractors.

The whole matrix (seeds, widths, both architectures, ablations) is in
``benchmarks/results/memory_learning/``; this is its cheapest cell, run in CI.
"""

from __future__ import annotations

import pytest
import torch

from memformer_fast import Memformer, MemformerConfig, SpikeClip, mrbp
from memformer_fast.app.recall import RecallTask, recall_accuracy


@pytest.mark.slow
def test_single_key_recall_from_the_defaults() -> None:
    """Decoder, d_model 64, defaults, AdamW 1e-3, SpikeClip (at 1.0 and 4x the recent norms), a
    curriculum over the number of segments only (2, 4, then 8): it recalls at T = 8 and at T = 16
    (never trained on), and guesses with its memory reset."""
    torch.manual_seed(0)
    task = RecallTask(segment_length=16, num_keys=8, num_distractors=15)
    config = MemformerConfig(
        vocab_size=task.vocab_size, d_model=64, n_heads=4, d_ff=256, n_decoder_layers=2,
        n_memory_slots=8, segment_length=16, architecture="decoder", backend="reference",
    )  # fmt: skip
    model = Memformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    clip = SpikeClip()
    batches = torch.Generator().manual_seed(0)
    for num_segments, updates in ((2, 100), (4, 100), (8, 60)):
        for _ in range(updates):
            ids, labels, _ = task.sample(64, num_segments, generator=batches)
            opt.zero_grad(set_to_none=True)
            mrbp.backward(model, ids, labels=labels)
            clip(model.parameters())
            opt.step()
    ids, _, keys = task.sample(256, 8, generator=torch.Generator().manual_seed(1))
    assert recall_accuracy(model, ids, keys) >= 0.95
    ids16, _, keys16 = task.sample(256, 16, generator=torch.Generator().manual_seed(2))
    assert recall_accuracy(model, ids16, keys16) >= 0.90
    assert recall_accuracy(model, ids, keys, reset_memory=True) <= task.chance + 0.1
