"""Backend choice (``memformer_fast.backends``): ``"auto"`` on the CPU, and the kernels' limits
under an explicit ``"triton"``."""

from __future__ import annotations

import pytest
import torch

from memformer_fast import functional
from memformer_fast.backends import resolve_backend


def test_auto_backend_on_cpu_is_reference():
    assert resolve_backend("auto", torch.device("cpu")) == "reference"


def test_triton_backend_rejects_sizes_beyond_the_kernels() -> None:
    """Explicit backend="triton" names the limit; "auto" would use the reference there."""
    q = torch.randn(1, 2, 1, 130)
    with pytest.raises(ValueError, match="head_dim <= 128, got 130"):
        functional.memory_read_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="head_dim <= 128, got 130"):
        functional.memory_write_attention(q, q, q, q, q, backend="triton")
    m = torch.randn(1, 2, 3000)
    with pytest.raises(ValueError, match="D <= 2048, got 3000"):
        functional.gated_memory_update(m, m, m[0], backend="triton")
