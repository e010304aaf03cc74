"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from memformer_fast import Memformer, MemformerConfig
from memformer_fast.app.cli import main
from memformer_fast.presets import preset

# A byte corpus for the command line's tests, and the flags of a model that trains in moments.
CLI_TEXT = "".join(
    f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(400)
).encode()
TINY_CLI = ["--d-model", "32", "--n-heads", "2", "--layers", "1", "--slots", "4"]
TINY_CLI += ["--segment-length", "16", "--segments", "3", "--batch-size", "4", "--no-progress"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``memformer-fast ARGV`` in process: ``(exit status, stdout, stderr)``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def compile_worker_env(cache: Path) -> dict[str, str]:
    """The environment of a worker process that compiles kernels: this one's less every
    ``TRITON_*`` variable (conftest's ``TRITON_INTERPRET=1``, and any cache, dump or override knob
    of the caller's), with Triton's and inductor's caches of its own under ``cache``, so that
    nothing it compiles is shared with (or read from, half-written) another process: the other
    target's worker, another test run, another checkout's CI. One thread per worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    return env | {
        "TRITON_HOME": str(cache),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "OMP_NUM_THREADS": "1",
    }


# The smallest useful model (memformer_fast.presets "tiny").
TINY_FIELDS: dict[str, Any] = preset("tiny")


def tiny_config(architecture: str = "decoder", **overrides: Any) -> MemformerConfig:
    """A tiny config; ``overrides`` replace any of ``TINY_FIELDS`` or set other fields."""
    return MemformerConfig(**{**TINY_FIELDS, "architecture": architecture, **overrides})


def tiny_model(architecture: str = "decoder", seed: int = 0, **overrides: Any) -> Memformer:
    """``Memformer(tiny_config(...))`` initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return Memformer(tiny_config(architecture, **overrides))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ``.grad`` of ``model`` that is set, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (docs/design.md, "Guarantees")."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


class LiveSavedBytes:
    """Peak bytes held by autograd for backward: every saved tensor counted while it is alive."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> LiveSavedBytes:
        meter = self

        class Held:
            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.n = t, t.numel() * t.element_size()
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self) -> None:
                meter.live -= self.n

        self._hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
