"""The test suite's NaN poisoning (conftest ``_nan_filled_empty``) reaches every allocator the
kernels' launchers and the custom ops use."""

from __future__ import annotations

import torch


def test_allocations_are_poisoned() -> None:
    x = torch.zeros(2, 3)
    for t in (torch.empty(2), torch.empty_like(x), x.new_empty((4,))):
        assert bool(t.isnan().all())
    assert not bool(torch.empty_like(x, dtype=torch.long).isnan().any())  # integers: no NaN


def test_an_unwritten_output_fails() -> None:
    """What the poisoning is for: a result that reads a slot nobody wrote is NaN."""
    out = torch.empty_like(torch.zeros(4))
    out[:3] = 1.0  # "forgets" the last element
    assert not bool(torch.isfinite(out).all())
