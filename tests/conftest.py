"""Shared test setup.

Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable must
be set before Triton is imported, so it is set here, first.
"""

from __future__ import annotations

import os

if not os.environ.get("MEMFORMER_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` returns NaN-filled floats, so an output a kernel forgets to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (SPEC 6)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
