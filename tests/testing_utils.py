"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from memformer_fast import Memformer, MemformerConfig, mrbp
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


def make_model(
    architecture: str = "decoder", *, dtype: torch.dtype = torch.float32, seed: int = 0,
    **overrides: Any,
) -> Memformer:  # fmt: skip
    """:func:`tiny_model` in training mode with its parameters and memory in ``dtype``; a test
    file binds its sizes once (``functools.partial(make_model, **SIZES)``)."""
    return tiny_model(architecture, seed, memory_dtype=dtype, **overrides).to(dtype).train()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ``.grad`` of ``model`` that is set, by parameter name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (docs/design.md, "Guarantees")."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


@dataclass
class BPTTAndMRBP:
    """What :func:`assert_mrbp_equals_bptt` compared: each side's parameter gradients and the
    gradient of its own copy of the given memory (None when no memory was given), and the
    segments MRBP counted."""

    bptt: dict[str, torch.Tensor]
    mrbp: dict[str, torch.Tensor]
    bptt_memory_grad: torch.Tensor | None
    mrbp_memory_grad: torch.Tensor | None
    num_segments: int


def assert_mrbp_equals_bptt(
    model: Memformer,
    input_ids: torch.Tensor,
    memory: torch.Tensor | None = None,
    *,
    tol: float,
    seed: int = 7,
    options: dict[str, Any] | None = None,
    **inputs: Any,
) -> BPTTAndMRBP:
    """``mrbp.backward`` against ``sequence_loss(...).backward()``, from fresh gradients and the
    same global seed (so the same rollout seed and dropout masks): the loss, the final memory
    ``[B, S, D]``, every parameter's gradient and the memory's are equal to relative error
    ``tol``, and the same parameters get a gradient.

    ``inputs`` go to both (``attention_mask``, ``labels``, ``resets``), ``options`` to
    ``mrbp.backward`` only (``compile``, ``offload``). A given ``memory`` is cloned for each side
    as a leaf that requires grad. The model's gradients are left as MRBP set them.
    """

    def leaf() -> torch.Tensor | None:
        return None if memory is None else memory.detach().clone().requires_grad_()

    model.zero_grad(set_to_none=True)
    m_bptt = leaf()
    torch.manual_seed(seed)
    loss, final = model.sequence_loss(input_ids, m_bptt, **inputs)
    loss.backward()
    expected = grads(model)

    model.zero_grad(set_to_none=True)
    m_mrbp = leaf()
    torch.manual_seed(seed)
    result = mrbp.backward(model, input_ids, m_mrbp, **inputs, **(options or {}))
    actual = grads(model)

    assert relative_error(result.loss, loss) < tol
    assert relative_error(result.memory, final) < tol
    assert actual.keys() == expected.keys()
    worst = max(relative_error(actual[n], expected[n]) for n in expected)
    assert worst < tol, worst
    if m_bptt is not None and m_mrbp is not None:
        assert (m_bptt.grad is None) == (m_mrbp.grad is None)
        if m_bptt.grad is not None and m_mrbp.grad is not None:
            assert relative_error(m_mrbp.grad, m_bptt.grad) < tol
    return BPTTAndMRBP(
        expected,
        actual,
        None if m_bptt is None else m_bptt.grad,
        None if m_mrbp is None else m_mrbp.grad,
        result.num_segments,
    )


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
