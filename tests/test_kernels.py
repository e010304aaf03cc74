"""Each Triton kernel against the reference: outputs and every gradient (docs/design.md,
"Guarantees").

Runs natively on CUDA, or on CPU tensors through ``TRITON_INTERPRET=1`` (set by conftest when there
is no GPU): the interpreter is about 1000x slower than eager, so the shapes are tiny but odd (they
cross tile borders: the interpreter tiles are 16 wide) and the token-split reductions are forced.
"""

from __future__ import annotations

import os

import pytest
import torch
from testing_utils import relative_error

from memformer_fast import reference

pytestmark = pytest.mark.interpreter

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (CUDA or INTERPRETER):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from memformer_fast import kernels  # noqa: E402  (after the skip: imports Triton)

DEVICE = "cuda" if CUDA else "cpu"
# bfloat16 runs under the interpreter too: triton_interpreter (installed by conftest) makes its
# tl.dot multiply bfloat16 inputs with float32 accumulation and its float32 -> bfloat16 casts
# round to nearest, as the GPU does.
DOT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _randn(*shape: int, dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """Random tensor of ``shape`` with a layout: contiguous, a transposed view (heads before
    length, as a [B, H, L, Dh] projection would give), or a last axis of stride 2."""
    if layout == "contiguous":
        return torch.randn(*shape, device=DEVICE).to(dtype)
    if layout == "transposed":
        return (
            torch.randn(shape[0], shape[2], shape[1], *shape[3:], device=DEVICE)
            .to(dtype)
            .transpose(1, 2)
        )
    return torch.randn(*shape, 2, device=DEVICE).to(dtype)[..., 0]


def _check(name: str, actual: torch.Tensor, lowp: torch.Tensor, exact: torch.Tensor) -> None:
    """float32: relative error < 1e-4 against the reference. float16/bfloat16: at most twice the
    error of the same-dtype reference against the float32 reference (flash-attention's rule)."""
    assert actual.dtype == lowp.dtype, f"{name}: dtype {actual.dtype}, expected {lowp.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if exact.norm() == 0:  # e.g. dq with a single slot: the softmax is constant
        assert actual.double().norm() < 1e-5 * actual.numel() ** 0.5, f"{name}: expected zeros"
        return
    err = relative_error(actual, exact)
    if actual.dtype in (torch.float32, torch.float64):
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
    else:
        ref_err = relative_error(lowp, exact)
        assert err <= 2.0 * ref_err + 1e-6, f"{name}: error {err:.2e} > 2 x reference {ref_err:.2e}"


def _reference_grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype):
    """Output and gradients of ``fn`` on ``inputs`` cast to ``dtype`` for the upstream ``grad``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]


# --------------------------------------------------------------------------------------------
# Memory read
# --------------------------------------------------------------------------------------------

READ_SHAPES = [  # B, L, S, H, Dh
    (2, 17, 5, 2, 48),
    (1, 100, 33, 1, 32),
    (2, 1, 1, 2, 16),
    (1, 20, 17, 2, 64),
    pytest.param((1, 521, 24, 2, 40), marks=pytest.mark.slow),  # a long segment
]


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", READ_SHAPES, ids=lambda s: "B{}-L{}-S{}-H{}-Dh{}".format(*s))
def test_memory_read(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    B, L, S, H, Dh = shape
    torch.manual_seed(0)
    q = _randn(B, L, H, Dh, dtype=dtype)
    k, v = (_randn(B, S, H, Dh, dtype=dtype) for _ in range(2))
    do = _randn(B, L, H, Dh, dtype=dtype)
    scale = Dh**-0.5
    fn = lambda q, k, v: reference.memory_read_attention(q, k, v, scale)
    exact = _reference_grads(fn, [q, k, v], do, torch.float32)
    lowp = _reference_grads(fn, [q, k, v], do, dtype)

    o, lse = kernels.memory_read_fwd(q, k, v, scale)
    grads = kernels.memory_read_bwd(do, q, k, v, lse, scale)
    for name, a, lo, ex in zip(("o", "dq", "dk", "dv"), (o, *grads), lowp, exact):
        _check(name, a, lo, ex)
    logits = torch.einsum("blhd,bshd->bhls", q.float(), k.float()) * scale
    assert relative_error(lse, torch.logsumexp(logits, -1)) < 1e-5


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_memory_read_strided_and_split(layout: str, num_splits: int) -> None:
    """Non-contiguous q, k, v and upstream gradient; dk/dv reduced over several query chunks."""
    B, L, S, H, Dh = 2, 40, 20, 2, 48
    torch.manual_seed(1)
    q = _randn(B, L, H, Dh, dtype=torch.float32, layout=layout)
    k, v = (_randn(B, S, H, Dh, dtype=torch.float32, layout=layout) for _ in range(2))
    do = _randn(B, L, H, Dh, dtype=torch.float32, layout=layout)
    fn = lambda q, k, v: reference.memory_read_attention(q, k, v, 0.2)
    exact = _reference_grads(fn, [q, k, v], do, torch.float32)
    o, lse = kernels.memory_read_fwd(q, k, v, 0.2)
    grads = kernels.memory_read_bwd(do, q, k, v, lse, 0.2, num_splits=num_splits)
    for name, a, ex in zip(("o", "dq", "dk", "dv"), (o, *grads), exact):
        _check(name, a, ex, ex)


# --------------------------------------------------------------------------------------------
# Memory write
# --------------------------------------------------------------------------------------------

WRITE_SHAPES = [  # B, S, L, H, Dh
    (2, 5, 17, 2, 48),
    (2, 33, 100, 1, 32),
    (2, 1, 1, 2, 16),
    (2, 17, 20, 2, 64),
    pytest.param((1, 24, 530, 2, 40), marks=pytest.mark.slow),  # a long segment
]


def _token_mask(B: int, L: int) -> torch.Tensor:
    """Random padding, with batch row 0 all padding (its slots must come back as v_self)."""
    mask = torch.rand(B, L, device=DEVICE) > 0.3
    mask[0] = False
    return mask


def _run_write(q, k_self, v_self, k, v, mask, do, temperature, scale, num_splits=None):
    o, lse = kernels.memory_write_fwd(
        q, k_self, v_self, k, v, mask, temperature, scale, num_splits=num_splits
    )
    grads = kernels.memory_write_bwd(
        do.to(o.dtype), q, k_self, v_self, k, v, mask, o, lse, temperature, scale, num_splits
    )
    return o.to(q.dtype), grads


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("shape", WRITE_SHAPES, ids=lambda s: "B{}-S{}-L{}-H{}-Dh{}".format(*s))
def test_memory_write(shape: tuple[int, ...], masked: bool, dtype: torch.dtype) -> None:
    B, S, L, H, Dh = shape
    torch.manual_seed(0)
    q, k_self, v_self = (_randn(B, S, H, Dh, dtype=dtype) for _ in range(3))
    k, v = (_randn(B, L, H, Dh, dtype=dtype) for _ in range(2))
    do = _randn(B, S, H, Dh, dtype=dtype)
    mask = _token_mask(B, L) if masked else None
    scale, temperature = Dh**-0.5, 0.5
    fn = lambda *t: reference.memory_write_attention(*t, mask, temperature, scale)
    inputs = [q, k_self, v_self, k, v]
    exact = _reference_grads(fn, inputs, do, torch.float32)
    lowp = _reference_grads(fn, inputs, do, dtype)

    o, grads = _run_write(q, k_self, v_self, k, v, mask, do, temperature, scale)
    names = ("o", "dq", "dk_self", "dv_self", "dk", "dv")
    for name, a, lo, ex in zip(names, (o, *grads), lowp, exact):
        _check(name, a, lo, ex)
    if masked:
        assert torch.equal(o[0], v_self[0]), "an all-padding row must give v_self exactly"


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_memory_write_strided_and_split(layout: str, num_splits: int) -> None:
    """Non-contiguous inputs, a strided mask; the token axis split across programs (the forward
    merges softmax states, the backward sums dq partials). Split 2 of batch row 1 sees padding
    only, and batch row 0 is all padding."""
    B, S, L, H, Dh = 2, 20, 48, 2, 48
    torch.manual_seed(2)
    q, k_self, v_self = (_randn(B, S, H, Dh, dtype=torch.float32, layout=layout) for _ in range(3))
    k, v = (_randn(B, L, H, Dh, dtype=torch.float32, layout=layout) for _ in range(2))
    do = _randn(B, S, H, Dh, dtype=torch.float32, layout=layout)
    mask = torch.rand(L, B, device=DEVICE).t() > 0.3  # strided
    mask[0] = False
    mask[1, 32:] = False
    fn = lambda *t: reference.memory_write_attention(*t, mask, 2.0, 0.2)
    exact = _reference_grads(fn, [q, k_self, v_self, k, v], do, torch.float32)
    o, grads = _run_write(q, k_self, v_self, k, v, mask, do, 2.0, 0.2, num_splits)
    names = ("o", "dq", "dk_self", "dv_self", "dk", "dv")
    for name, a, ex in zip(names, (o, *grads), exact):
        _check(name, a, ex, ex)
    assert torch.equal(o[0], v_self[0])


def test_memory_write_ignores_padded_values() -> None:
    """NaN in the keys and values of padded tokens never reaches the output or any gradient."""
    B, S, L, H, Dh = 2, 3, 20, 1, 16
    torch.manual_seed(7)
    q, k_self, v_self = (_randn(B, S, H, Dh, dtype=torch.float32) for _ in range(3))
    k, v = (_randn(B, L, H, Dh, dtype=torch.float32) for _ in range(2))
    do = _randn(B, S, H, Dh, dtype=torch.float32)
    mask = _token_mask(B, L)
    fn = lambda *t: reference.memory_write_attention(*t, mask, 0.5, 0.25)
    exact = _reference_grads(fn, [q, k_self, v_self, k, v], do, torch.float32)
    k[~mask], v[~mask] = float("nan"), float("nan")
    o, grads = _run_write(q, k_self, v_self, k, v, mask, do, 0.5, 0.25, num_splits=2)
    for name, a, ex in zip(("o", "dq", "dk_self", "dv_self", "dk", "dv"), (o, *grads), exact):
        _check(name, a, ex, ex)


def test_memory_write_extreme_logits() -> None:
    """Large logits (a sharp write, temperature 0.05: logits of about +-20) stay finite and
    accurate: the online softmax rescales across tiles and splits."""
    B, S, L, H, Dh = 1, 3, 40, 1, 16
    torch.manual_seed(3)
    q, k_self, v_self = (_randn(B, S, H, Dh, dtype=torch.float32) for _ in range(3))
    k, v = (_randn(B, L, H, Dh, dtype=torch.float32) for _ in range(2))
    do = _randn(B, S, H, Dh, dtype=torch.float32)
    fn = lambda *t: reference.memory_write_attention(*t, None, 0.05, 0.25)
    exact = _reference_grads(fn, [q, k_self, v_self, k, v], do, torch.float32)
    o, grads = _run_write(q, k_self, v_self, k, v, None, do, 0.05, 0.25, num_splits=2)
    for name, a, ex in zip(("o", "dq", "dk_self", "dv_self", "dk", "dv"), (o, *grads), exact):
        _check(name, a, ex, ex)


# --------------------------------------------------------------------------------------------
# Gated BMN update
# --------------------------------------------------------------------------------------------

GATED_SHAPES = [(2, 5, 48), (3, 33, 32), (1, 1, 100), (5, 3, 512)]  # B, S, D


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("shape", GATED_SHAPES, ids=lambda s: "B{}-S{}-D{}".format(*s))
def test_gated_update(shape: tuple[int, int, int], gated: bool, dtype: torch.dtype) -> None:
    B, S, D = shape
    torch.manual_seed(0)
    memory, candidate = (_randn(B, S, D, dtype=dtype) for _ in range(2))
    bias = _randn(S, D, dtype=dtype)
    gate = _randn(B, S, D, dtype=dtype) if gated else None
    dout = _randn(B, S, D, dtype=dtype)
    if gated:
        inputs = [memory, candidate, bias, gate]
        fn = lambda m, c, b, g: reference.gated_memory_update(m, c, b, g, 1e-6)
    else:
        inputs = [candidate, bias]
        fn = lambda c, b: reference.gated_memory_update(memory.to(c.dtype), c, b, None, 1e-6)
    exact = _reference_grads(fn, inputs, dout, torch.float32)
    lowp = _reference_grads(fn, inputs, dout, dtype)

    out = kernels.gated_update_fwd(memory, candidate, bias, gate, 1e-6)
    dm, dc, db, dg = kernels.gated_update_bwd(dout, memory, candidate, bias, gate, 1e-6)
    if gated:
        actual, names = (out, dm, dc, db, dg), ("out", "dmemory", "dcandidate", "dbias", "dgate")
    else:
        assert dm is None and dg is None
        actual, names = (out, dc, db), ("out", "dcandidate", "dbias")
    for name, a, lo, ex in zip(names, actual, lowp, exact):
        _check(name, a, lo, ex)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gated_update_strided_and_split(layout: str, num_splits: int) -> None:
    """Non-contiguous inputs; the bias gradient summed over batch chunks."""
    B, S, D = 7, 6, 40
    torch.manual_seed(4)
    memory, candidate, gate, dout = (
        _randn(B, S, D, dtype=torch.float32, layout=layout) for _ in range(4)
    )
    bias = _randn(S, D, dtype=torch.float32, layout="strided")
    fn = lambda m, c, b, g: reference.gated_memory_update(m, c, b, g, 1e-6)
    exact = _reference_grads(fn, [memory, candidate, bias, gate], dout, torch.float32)
    out = kernels.gated_update_fwd(memory, candidate, bias, gate, 1e-6)
    grads = kernels.gated_update_bwd(dout, memory, candidate, bias, gate, 1e-6, num_splits)
    for name, a, ex in zip(("out", "dm", "dc", "db", "dg"), (out, *grads), exact):
        _check(name, a, ex, ex)


def test_gated_update_tiny_norm() -> None:
    """A slot whose update has norm below eps is divided by eps, with clamp_min's gradient."""
    B, S, D = 2, 3, 16
    torch.manual_seed(5)
    candidate = torch.randn(B, S, D, device=DEVICE)
    bias = torch.randn(S, D, device=DEVICE)
    candidate[0, 1] = -bias[1] + 1e-9  # u = 1e-9 * ones: norm 4e-9 < eps
    dout = torch.randn(B, S, D, device=DEVICE)
    fn = lambda c, b: reference.gated_memory_update(c, c, b, None, 1e-6)
    exact = _reference_grads(fn, [candidate, bias], dout, torch.float32)
    out = kernels.gated_update_fwd(candidate, candidate, bias, None, 1e-6)
    _, dc, db, _ = kernels.gated_update_bwd(dout, candidate, candidate, bias, None, 1e-6)
    for name, a, ex in zip(("out", "dc", "db"), (out, dc, db), exact):
        _check(name, a, ex, ex)


# --------------------------------------------------------------------------------------------
# float64 gradcheck of the kernels themselves (the interpreter runs float64 tl.dot)
# --------------------------------------------------------------------------------------------


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = kernels.memory_read_fwd(q, k, v, 0.3)
        ctx.save_for_backward(q, k, v, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lse = ctx.saved_tensors
        return kernels.memory_read_bwd(do, q, k, v, lse, 0.3, num_splits=2)


class _Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_self, v_self, k, v, mask):
        o, lse = kernels.memory_write_fwd(q, k_self, v_self, k, v, mask, 0.7, 0.3, num_splits=2)
        ctx.save_for_backward(q, k_self, v_self, k, v, mask, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_self, v_self, k, v, mask, o, lse = ctx.saved_tensors
        grads = kernels.memory_write_bwd(
            do, q, k_self, v_self, k, v, mask, o, lse, 0.7, 0.3, num_splits=2
        )
        return (*grads, None)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, candidate, bias, gate):
        ctx.save_for_backward(memory, candidate, bias, gate)
        return kernels.gated_update_fwd(memory, candidate, bias, gate, 1e-6)

    @staticmethod
    def backward(ctx, dout):
        return kernels.gated_update_bwd(dout, *ctx.saved_tensors, 1e-6, num_splits=2)


@pytest.mark.skipif(CUDA, reason="float64 tl.dot is an interpreter-only configuration")
def test_gradcheck_float64() -> None:
    torch.manual_seed(6)
    f64 = dict(dtype=torch.float64, device=DEVICE, requires_grad=True)
    q, k, v = (
        torch.randn(1, 20, 1, 16, **f64),
        torch.randn(1, 3, 1, 16, **f64),
        torch.randn(1, 3, 1, 16, **f64),
    )
    assert torch.autograd.gradcheck(_Read.apply, (q, k, v), fast_mode=True)
    qs, ks, vs = (torch.randn(2, 3, 1, 16, **f64) for _ in range(3))
    kt, vt = (torch.randn(2, 20, 1, 16, **f64) for _ in range(2))
    mask = torch.rand(2, 20, device=DEVICE) > 0.3
    assert torch.autograd.gradcheck(_Write.apply, (qs, ks, vs, kt, vt, mask), fast_mode=True)
    m, c, g = (torch.randn(4, 3, 8, **f64) for _ in range(3))
    b = torch.randn(3, 8, **f64)
    assert torch.autograd.gradcheck(_Gated.apply, (m, c, b, g), fast_mode=True)
