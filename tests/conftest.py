"""Shared test setup.

Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable must
be set before Triton is imported, so it is set here, first, and the interpreter is then patched to
compute as a GPU does (``triton_interpreter``: bfloat16 dots and casts, runtime loop bounds).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from testing_utils import CLI_TEXT

from memformer_fast.backends import interpreter_enabled, triton_available

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if interpreter_enabled() and triton_available():
    # The interpreter as a GPU would compute (bfloat16 dots, runtime loop bounds): test-only.
    import triton_interpreter

    triton_interpreter.install()


@pytest.fixture(autouse=True)
def _nan_filled_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return NaN-filled floats, so
    an output a kernel forgets to write (``o``, ``lse``, ``delta``, ``dv``, ``l_part``, ``dgate``,
    ...) fails loudly instead of passing on whatever the allocator left there."""

    def poisoned(allocate):  # type: ignore[no-untyped-def]
        def allocate_nan(*args, **kwargs):  # type: ignore[no-untyped-def]
            t = allocate(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t

        return allocate_nan

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


@pytest.fixture
def one_thread() -> object:
    """Tiny models: a second thread only adds contention on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small byte corpus (``testing_utils.CLI_TEXT``) in a file."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(CLI_TEXT)
    return path


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
