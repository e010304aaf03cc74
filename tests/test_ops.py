"""The custom ops of :mod:`memformer_fast.ops`: ``opcheck``, float64 ``gradcheck``,
``torch.compile(fullgraph=True)`` and the ``backend="triton"`` path of ``functional``.

Each op runs its Triton kernels on CUDA and, on CPU tensors, through the interpreter when
``TRITON_INTERPRET=1`` (set by conftest without a GPU), else the PyTorch fallback. The ``path``
fixture runs the tests on both: "triton" (CUDA or the interpreter) and "fallback" (CPU with the
interpreter switched off for the call).
"""

from __future__ import annotations

import os

import pytest
import torch
from testing_utils import relative_error

from memformer_fast import functional, ops, reference

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if CUDA or INTERPRETER:
    # Import the kernels while TRITON_INTERPRET has its session value: Triton decides at
    # decoration time whether a kernel is interpreted.
    import memformer_fast.kernels  # noqa: F401


@pytest.fixture(
    params=[
        pytest.param("triton", marks=pytest.mark.interpreter),
        pytest.param("fallback"),
    ]
)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Device of the test tensors; "fallback" turns the interpreter off for the test."""
    if request.param == "triton":
        if not (CUDA or INTERPRETER):
            pytest.skip("needs CUDA or TRITON_INTERPRET=1")
        return "cuda" if CUDA else "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return "cpu"


def _read_args(device: str, dtype: torch.dtype, requires_grad: bool = True):
    torch.manual_seed(0)
    kw = dict(device=device, dtype=dtype, requires_grad=requires_grad)
    return (
        torch.randn(2, 17, 2, 16, **kw),
        torch.randn(2, 5, 2, 16, **kw),
        torch.randn(2, 5, 2, 16, **kw),
    )


def _write_args(device: str, dtype: torch.dtype, requires_grad: bool = True):
    torch.manual_seed(1)
    kw = dict(device=device, dtype=dtype, requires_grad=requires_grad)
    q, k_self, v_self = (torch.randn(2, 5, 2, 16, **kw) for _ in range(3))
    k, v = (torch.randn(2, 17, 2, 16, **kw) for _ in range(2))
    mask = torch.rand(2, 17, device=device) > 0.3
    mask[0] = False
    return q, k_self, v_self, k, v, mask


def _gated_args(device: str, dtype: torch.dtype, requires_grad: bool = True):
    torch.manual_seed(2)
    kw = dict(device=device, dtype=dtype, requires_grad=requires_grad)
    memory, candidate, gate = (torch.randn(3, 5, 24, **kw) for _ in range(3))
    return memory, candidate, torch.randn(5, 24, **kw), gate


def _detached(args: tuple) -> tuple:
    """The backward ops are not differentiable themselves (no double backward)."""
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def test_schemas() -> None:
    """Each op's schema is its reference forward's; the backward's is generated from it, and each
    portable op declares the schema of its op."""
    for name in ("memory_read", "memory_write", "gated_memory_update"):
        fwd, bwd = (getattr(torch.ops.memformer_fast, f"{name}_{d}") for d in ("fwd", "bwd"))
        inferred = torch.library.infer_schema(getattr(reference, name), mutates_args=())
        assert str(fwd.default._schema) == f"memformer_fast::{name}_fwd{inferred}"
        params = str(fwd.default._schema).split("(", 1)[1].split(") -> ")[0]
        outs = ", ".join(f"Tensor out{i}" for i in range(len(fwd.default._schema.returns)))
        assert str(bwd.default._schema) == (
            f"memformer_fast::{name}_bwd(Tensor grad, {params}, {outs}) -> Tensor[]"
        )
        for d, op in (("fwd", fwd), ("bwd", bwd)):
            portable = getattr(torch.ops.memformer_fast, f"{name}_{d}_portable").default._schema
            assert str(portable).replace("_portable", "") == str(op.default._schema)


def test_opcheck(path: str) -> None:
    """Schema, fake tensors, autograd registration and AOT dispatch of every op, both paths."""
    f32 = torch.float32
    q, k, v = _read_args(path, f32)
    torch.library.opcheck(torch.ops.memformer_fast.memory_read_fwd.default, (q, k, v, 0.25))
    o, lse = ops.memory_read_fwd(q, k, v, 0.25)
    args = _detached((torch.randn_like(q), q, k, v, 0.25, o, lse))
    torch.library.opcheck(torch.ops.memformer_fast.memory_read_bwd.default, args)

    q, k_self, v_self, k, v, mask = _write_args(path, f32)
    for m in (mask, None):
        args = (q, k_self, v_self, k, v, m, 0.5, 0.25)
        torch.library.opcheck(torch.ops.memformer_fast.memory_write_fwd.default, args)
    o, lse = ops.memory_write_fwd(q, k_self, v_self, k, v, mask, 0.5, 0.25)
    args = _detached((torch.randn_like(o), q, k_self, v_self, k, v, mask, 0.5, 0.25, o, lse))
    torch.library.opcheck(torch.ops.memformer_fast.memory_write_bwd.default, args)

    memory, candidate, bias, gate = _gated_args(path, f32)
    for g in (gate, None):
        args = (memory, candidate, bias, g, 1e-6)
        torch.library.opcheck(torch.ops.memformer_fast.gated_memory_update_fwd.default, args)
        out = ops.gated_memory_update_fwd(memory, candidate, bias, g, 1e-6)
        args = _detached((torch.randn_like(memory), memory, candidate, bias, g, 1e-6, out))
        torch.library.opcheck(torch.ops.memformer_fast.gated_memory_update_bwd.default, args)


def test_gradcheck_float64(path: str) -> None:
    """Analytical (the backward ops) against numerical gradients, in float64."""
    if path == "cuda":
        pytest.skip("float64 kernels are an interpreter-only configuration")
    f64 = torch.float64
    q, k, v = _read_args(path, f64)
    fn = lambda q, k, v: ops.memory_read_attention(q, k, v, 0.3)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    q, k_self, v_self, k, v, mask = _write_args(path, f64)
    fn = lambda *t: ops.memory_write_attention(*t, mask, 0.7, 0.3)
    assert torch.autograd.gradcheck(fn, (q, k_self, v_self, k, v), fast_mode=True)
    memory, candidate, bias, gate = _gated_args(path, f64)
    fn = lambda *t: ops.gated_memory_update(*t, 1e-6)
    assert torch.autograd.gradcheck(fn, (memory, candidate, bias, gate), fast_mode=True)
    fn = lambda c, b: ops.gated_memory_update(memory.detach(), c, b, None, 1e-6)
    assert torch.autograd.gradcheck(fn, (candidate, bias), fast_mode=True)


def _all_three(q, k, v, wq, wks, wvs, memory, bias, gate):
    """The three ops chained the way the model chains them, reduced to a scalar loss."""
    o = ops.memory_read_attention(q, k, v, 0.25)
    written = ops.memory_write_attention(wq, wks, wvs, o, o, None, 0.5, 0.25)
    new = ops.gated_memory_update(memory, written.flatten(2), bias, gate, 1e-6)
    return (new * torch.linspace(-1, 1, new.shape[-1])).sum()


def test_compile_fullgraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """All three ops (forward and backward) under torch.compile(fullgraph=True), on the CPU
    fallback: same loss and gradients as eager."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(3)
    shapes = [(2, 17, 2, 16), (2, 5, 2, 16), (2, 5, 2, 16)] + [(2, 5, 2, 16)] * 3
    shapes += [(2, 5, 32), (5, 32), (2, 5, 32)]
    inputs = [torch.randn(*s, requires_grad=True) for s in shapes]
    eager = _all_three(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(_all_three, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    assert relative_error(compiled, eager) < 1e-5
    for a, e in zip(compiled_grads, eager_grads):
        assert relative_error(a, e) < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_functional_triton_backend(dtype: torch.dtype) -> None:
    """functional(..., backend="triton") against backend="reference": outputs and gradients."""
    if not (CUDA or INTERPRETER):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if CUDA else "cpu"
    tol = 1e-4 if dtype == torch.float32 else 5e-3

    def run(backend: str, fn, inputs, **kwargs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves, backend=backend, **kwargs)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
        return [out, *torch.autograd.grad(out, leaves, grad)]

    cases = [
        (functional.memory_read_attention, _read_args(device, dtype), {}),
        (
            functional.memory_write_attention,
            _write_args(device, dtype)[:5],
            {"token_mask": _write_args(device, dtype)[5], "temperature": 0.5},
        ),
        (functional.gated_memory_update, _gated_args(device, dtype), {}),
    ]
    for fn, inputs, kwargs in cases:
        expected = run("reference", fn, inputs, **kwargs)
        actual = run("triton", fn, inputs, **kwargs)
        for a, e in zip(actual, expected):
            assert a.dtype == e.dtype == dtype
            assert relative_error(a, e) < tol, fn.__name__


@pytest.mark.interpreter
def test_write_all_padding_is_exact() -> None:
    """Through the op (rounding outside it included): an all-padding row returns v_self."""
    if not (CUDA or INTERPRETER):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if CUDA else "cpu"
    q, k_self, v_self, k, v, mask = _write_args(device, torch.float16, requires_grad=False)
    o = functional.memory_write_attention(
        q, k_self, v_self, k, v, token_mask=mask, backend="triton"
    )
    assert torch.equal(o[0], v_self[0])
