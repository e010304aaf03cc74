"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from memformer_fast import (
    Memformer,
    MemformerConfig,
    MemoryReader,
    ReplayBuffer,
    functional,
    layers,
    mrbp,
    validation,
)
from memformer_fast.app.cli import main
from memformer_fast.app.data import VOCAB_SIZE, ByteData
from memformer_fast.app.training import Trainer, TrainSettings
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


def run_checked(
    command: Sequence[str], timeout: float, **options: Any
) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end, its output captured as text (``options``: ``cwd``, ``env``...
    of ``subprocess.run``); fails the test, with the ends of its output, unless it succeeded."""
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, **options
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def small_trainer(steps: int) -> Trainer:
    """A byte-level trainer of a small decoder (dropout on) over ``CLI_TEXT``: ``steps`` steps,
    an evaluation every 2, no checkpoint of its own."""
    cfg = MemformerConfig(
        vocab_size=VOCAB_SIZE, d_model=32, n_heads=2, d_ff=64, n_decoder_layers=1,
        n_memory_slots=4, segment_length=16, architecture="decoder", backend="reference",
        dropout=0.1,
    )  # fmt: skip
    settings = TrainSettings(batch_size=4, segments=3, steps=steps, warmup_steps=3, eval_every=2,
                             eval_bytes=128, save_every=100)  # fmt: skip
    data = ByteData.from_bytes(CLI_TEXT[:6000], 48, settings.val_fraction)
    return Trainer.create(cfg, data, settings)


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


def count_checks(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """Count every argument check of ``layers``, ``functional`` and ``validation`` (a function
    named ``check_*``, ``_check_*`` or ``mask_format``) as (check, what it was called for: its
    first string argument, the argument's name, or "" without one), wherever the package calls
    it from: each module of ``memformer_fast`` that imported a check has its name patched too."""
    counts: Counter[tuple[str, str]] = Counter()

    def counting(name: str, check: Any) -> Any:
        def counted(*args: object, **kwargs: object) -> object:
            label = next((a for a in args if isinstance(a, str)), "")
            counts[(name, label)] += 1
            return check(*args, **kwargs)

        return counted

    counted = {
        check: counting(name, check)
        for module in (layers, functional, validation)
        for name, check in vars(module).items()
        if name.startswith(("check_", "_check_", "mask_format")) and callable(check)
    }
    for module_name, module in list(sys.modules.items()):
        if module_name.split(".")[0] == "memformer_fast":
            for name, value in list(vars(module).items()):
                if callable(value) and value in counted:
                    monkeypatch.setattr(module, name, counted[value])
    return counts


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


# ------------------------------------------------------------------------------------ bad calls
# The harness of test_validation.py and test_resets.py: each bad call must raise the right
# exception and change nothing in the environment it was given.

BAD_CALL_OPS = (2, 5, 3, 2, 4)  # the op inputs: batch, tokens, slots, heads, head dim
BAD_CALL_MODEL: dict[str, Any] = dict(  # the two models: rollouts of 2 segments, 2 rows
    vocab_size=11,
    d_model=16,
    n_encoder_layers=1,
    n_decoder_layers=1,
    n_memory_slots=3,
    segment_length=4,
)
META = torch.device("meta")  # stands in for a second device


@dataclass(frozen=True)
class Case:
    """One bad call: what it does, the exception it must raise, what the message must say."""

    id: str
    call: Callable[[SimpleNamespace], object]
    error: type[BaseException]
    says: tuple[str, ...]


def bad_call_env() -> SimpleNamespace:
    """Two tiny models with gradients already accumulated, a carried memory, op inputs."""
    B, L, S, H, DH = BAD_CALL_OPS
    vocab, width, seg = (BAD_CALL_MODEL[k] for k in ("vocab_size", "d_model", "segment_length"))
    torch.manual_seed(0)
    e = SimpleNamespace()
    e.dec = Memformer(tiny_config("decoder", **BAD_CALL_MODEL))
    e.encdec = Memformer(tiny_config("encoder-decoder", **BAD_CALL_MODEL))
    e.ids = torch.randint(0, vocab, (2, 2 * seg))  # a rollout of two segments
    e.seg = e.ids[:, :seg]
    for model in (e.dec, e.encdec):
        model.sequence_loss(e.ids)[0].backward()  # every .grad exists: accumulation must not move
    e.memory = e.dec.init_memory(2).detach().clone()
    e.h = torch.randn(2, seg, width)
    e.reader = MemoryReader(width, 2, backend="reference")
    # op inputs
    e.q, e.k, e.v = torch.randn(B, L, H, DH), torch.randn(B, S, H, DH), torch.randn(B, S, H, DH)
    e.qs, e.ks, e.vs = torch.randn(B, S, H, DH), torch.randn(B, S, H, DH), torch.randn(B, S, H, DH)
    e.kt, e.vt = torch.randn(B, L, H, DH), torch.randn(B, L, H, DH)
    e.mask = torch.rand(B, L) > 0.3
    e.m, e.c, e.g = torch.randn(B, S, width), torch.randn(B, S, width), torch.randn(B, S, width)
    e.bias = torch.randn(S, width)
    return e


def snapshot(e: SimpleNamespace) -> dict[str, object]:
    """Clones of everything a failed call must leave alone."""
    state: dict[str, object] = {}
    for name, value in vars(e).items():
        if isinstance(value, torch.Tensor):
            state[name] = value.clone()
        elif isinstance(value, torch.nn.Module):
            for pname, p in value.named_parameters():
                state[f"{name}.{pname}"] = p.detach().clone()
                state[f"{name}.{pname}.grad"] = None if p.grad is None else p.grad.clone()
        elif isinstance(value, ReplayBuffer):
            state[name] = [(value.get(i).clone(), value.rng_seed(i)) for i in range(len(value))]
    return state


def assert_same(before: object, after: object, name: str) -> None:
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and torch.equal(before, after), f"{name} changed"
    elif isinstance(before, list):
        assert isinstance(after, list) and len(before) == len(after), f"{name} changed length"
        for i, ((s0, r0), (s1, r1)) in enumerate(zip(before, after)):
            assert torch.equal(s0, s1) and r0 == r1, f"{name}[{i}] changed"
    else:
        assert before is None and after is None, f"{name} changed"


def check_case(e: SimpleNamespace, case: Case) -> None:
    """The call raises the case's exception with every fragment, and changes nothing in ``e``."""
    before = snapshot(e)
    with pytest.raises(case.error) as info:
        case.call(e)
    message = str(info.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    after = snapshot(e)
    assert before.keys() == after.keys()
    for name in before:
        assert_same(before[name], after[name], name)
