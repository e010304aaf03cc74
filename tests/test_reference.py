"""The reference operations against direct, loop-based formulas of docs/design.md,
"The three operations"."""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import relative_error

from memformer_fast import functional as Fn


def _read_direct(q, k, v, scale):
    B, L, H, _ = q.shape
    o = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for n in range(L):
            for h in range(H):
                w = torch.softmax(
                    torch.stack([q[b, n, h] @ k[b, j, h] for j in range(k.shape[1])]) * scale, 0
                )
                o[b, n, h] = sum(w[j] * v[b, j, h] for j in range(k.shape[1]))
    return o


def _write_direct(q, k_self, v_self, k, v, mask, temperature, scale):
    B, S, H, _ = q.shape
    o = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for i in range(S):
            for h in range(H):
                keys = [k_self[b, i, h]] + [k[b, j, h] for j in range(k.shape[1]) if mask[b, j]]
                vals = [v_self[b, i, h]] + [v[b, j, h] for j in range(k.shape[1]) if mask[b, j]]
                w = torch.softmax(
                    torch.stack([q[b, i, h] @ kk for kk in keys]) * scale / temperature, 0
                )
                o[b, i, h] = sum(wj * vj for wj, vj in zip(w, vals))
    return o


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("B,L,S,H,Dh", [(1, 1, 1, 1, 4), (2, 5, 3, 2, 6), (2, 7, 4, 3, 5)])
def test_read_matches_direct_formula(B, L, S, H, Dh):
    q, k, v = _rand(B, L, H, Dh), _rand(B, S, H, Dh), _rand(B, S, H, Dh)
    out = Fn.memory_read_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, _read_direct(q, k, v, Dh**-0.5))
    out = Fn.memory_read_attention(q, k, v, scale=0.3, backend="reference")
    torch.testing.assert_close(out, _read_direct(q, k, v, 0.3))


@pytest.mark.parametrize("B,L,S,H,Dh", [(1, 1, 1, 1, 4), (2, 5, 3, 2, 6), (2, 9, 4, 3, 5)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_write_matches_direct_formula(B, L, S, H, Dh, temperature):
    q, ks, vs = _rand(B, S, H, Dh), _rand(B, S, H, Dh), _rand(B, S, H, Dh)
    k, v = _rand(B, L, H, Dh), _rand(B, L, H, Dh)
    mask = torch.rand(B, L) > 0.4
    mask[0] = False  # a row with no real token at all
    out = Fn.memory_write_attention(
        q, ks, vs, k, v, token_mask=mask, temperature=temperature, backend="reference"
    )
    torch.testing.assert_close(out, _write_direct(q, ks, vs, k, v, mask, temperature, Dh**-0.5))
    assert torch.equal(out[0], vs[0]), "an all-padding row must give v_self exactly"
    nomask = Fn.memory_write_attention(
        q, ks, vs, k, v, temperature=temperature, backend="reference"
    )
    full = torch.ones(B, L, dtype=torch.bool)
    torch.testing.assert_close(nomask, _write_direct(q, ks, vs, k, v, full, temperature, Dh**-0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_padding_row_is_v_self_exactly_in_every_dtype(dtype):
    q, ks, vs = (_rand(2, 3, 2, 8, dtype=dtype) for _ in range(3))
    k, v = _rand(2, 5, 2, 8, dtype=dtype), _rand(2, 5, 2, 8, dtype=dtype)
    out = Fn.memory_write_attention(
        q, ks, vs, k, v, token_mask=torch.zeros(2, 5, dtype=torch.bool), backend="reference"
    )
    assert out.dtype == dtype and torch.equal(out, vs)


@pytest.mark.parametrize("gated", [False, True])
def test_update_matches_formula(gated):
    B, S, D = 3, 5, 7
    m, c, bias = _rand(B, S, D), _rand(B, S, D), _rand(S, D)
    g = _rand(B, S, D) if gated else None
    out = Fn.gated_memory_update(m, c, bias, g, backend="reference")
    gate = torch.sigmoid(g) if gated else torch.ones_like(m)
    u = gate * c + (1 - gate) * m + bias
    torch.testing.assert_close(out, u / u.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(B, S, dtype=torch.float64))


def test_update_norm_floor_eps():
    m = torch.zeros(1, 2, 4, dtype=torch.float64)
    out = Fn.gated_memory_update(
        m, m, torch.zeros(2, 4, dtype=torch.float64), eps=0.5, backend="reference"
    )
    assert torch.equal(out, torch.zeros_like(out))


def test_pure_bmn_drifts_to_normalised_bias():
    """With nothing written (candidate = old slot), repeated BMN converges to bias / ||bias||."""
    S, D = 4, 6
    bias = _rand(S, D) * 0.3
    m = torch.nn.functional.normalize(_rand(1, S, D), dim=-1)
    for _ in range(400):
        m = Fn.gated_memory_update(m, m, bias, backend="reference")
    torch.testing.assert_close(m[0], torch.nn.functional.normalize(bias, dim=-1), atol=1e-6, rtol=0)


def test_gradcheck_float64():
    q, k, v = (_rand(2, n, 2, 3).requires_grad_() for n in (4, 3, 3))
    assert torch.autograd.gradcheck(
        lambda *a: Fn.memory_read_attention(*a, backend="reference"), (q, k, v)
    )
    q, ks, vs = (_rand(2, 3, 2, 3).requires_grad_() for _ in range(3))
    k, v = (_rand(2, 4, 2, 3).requires_grad_() for _ in range(2))
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    assert torch.autograd.gradcheck(
        lambda *a: Fn.memory_write_attention(
            *a, token_mask=mask, temperature=0.7, backend="reference"
        ),
        (q, ks, vs, k, v),
    )
    m, c, g = (_rand(2, 3, 4).requires_grad_() for _ in range(3))
    bias = _rand(3, 4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *a: Fn.gated_memory_update(*a, backend="reference"), (m, c, bias, g)
    )


def test_low_precision_accumulates_in_float32():
    """fp16/bf16 reference within a few ulps of a float32 computation, dtype preserved."""
    q, k, v = _rand(2, 33, 4, 16), _rand(2, 17, 4, 16), _rand(2, 17, 4, 16)
    exact = Fn.memory_read_attention(q, k, v, backend="reference")
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        out = Fn.memory_read_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="reference")
        assert out.dtype == dtype
        assert relative_error(out, exact) < tol


def test_non_contiguous_inputs_match_contiguous():
    q = _rand(2, 2, 6, 8).transpose(1, 2)  # [2, 6, 2, 8] with length and heads swapped in memory
    k = _rand(2, 4, 2, 16)[..., ::2]  # strided head dim
    v = _rand(2, 2, 4, 8).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    dense = [t.contiguous() for t in (q, k, v)]
    torch.testing.assert_close(
        Fn.memory_read_attention(q, k, v, backend="reference"),
        Fn.memory_read_attention(*dense, backend="reference"),
    )
    mask = torch.rand(2, 6) > 0.5
    out = Fn.memory_write_attention(k, v, k, q, q, token_mask=mask, backend="reference")
    dq, dk, dv = dense
    torch.testing.assert_close(
        out, Fn.memory_write_attention(dk, dv, dk, dq, dq, token_mask=mask, backend="reference")
    )


def test_random_upstream_gradients_match_autograd_of_direct_formula():
    """Gradients of the reference op equal those of the loop formula, random upstream grads."""
    B, L, S, H, Dh = 2, 5, 3, 2, 4
    args = [
        _rand(B, S, H, Dh),
        _rand(B, S, H, Dh),
        _rand(B, S, H, Dh),
        _rand(B, L, H, Dh),
        _rand(B, L, H, Dh),
    ]
    mask = torch.rand(B, L) > 0.3
    grad_out = _rand(B, S, H, Dh)
    a1 = [a.clone().requires_grad_() for a in args]
    a2 = [a.clone().requires_grad_() for a in args]
    Fn.memory_write_attention(*a1, token_mask=mask, temperature=0.5, backend="reference").backward(
        grad_out
    )
    _write_direct(*a2, mask, 0.5, Dh**-0.5).backward(grad_out)
    for x, y in zip(a1, a2):
        torch.testing.assert_close(x.grad, y.grad)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _rand(1, 2, 1, 9), _rand(1, 3, 1, 9), _rand(1, 3, 1, 9)
    torch.testing.assert_close(
        Fn.memory_read_attention(q, k, v, backend="reference"),
        Fn.memory_read_attention(q, k, v, scale=1 / math.sqrt(9), backend="reference"),
    )
