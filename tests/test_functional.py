"""The three operations of ``memformer_fast.functional``: property-based tests (hypothesis) of
their shapes and values, and double backward per backend.

The oracles are independent of ``reference.py``: ``scaled_dot_product_attention`` for both
attentions (the write as one query per slot over ``[self, tokens]``) and ``F.normalize`` for the
update. Invariants: slot/token permutations, the convex hull of the values, an all-padding row
giving ``v_self`` exactly, masked tokens being ignored, unit-norm updates, scale invariance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import relative_error

from memformer_fast import functional
from memformer_fast.backends import triton_available

# The conftest's autouse fixtures are function-scoped; they are idempotent, so sharing them across
# examples is fine.
PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

sizes = st.integers(1, 6)
head_dims = st.integers(1, 9)
seeds = st.integers(0, 2**31 - 1)
magnitudes = st.sampled_from([1e-3, 1.0, 8.0])  # flat, typical and peaked softmax
dtypes = st.sampled_from(list(DTYPE_TOL))


def randn(g: torch.Generator, *shape: int, mag: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64) * mag


# ------------------------------------------------------------------ memory read


def read_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, *, Dh]
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


@PROPERTY
@given(sizes, sizes, sizes, st.integers(1, 3), head_dims, seeds, magnitudes, dtypes)
def test_read_matches_attention_oracle(B, L, S, H, Dh, seed, mag, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k, v = randn(g, B, L, H, Dh, mag=mag), randn(g, B, S, H, Dh, mag=mag), randn(g, B, S, H, Dh)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o = functional.memory_read_attention(q, k, v, backend="reference")
    assert o.shape == (B, L, H, Dh) and o.dtype == dtype
    assert relative_error(o, read_oracle(q, k, v, Dh**-0.5)) < DTYPE_TOL[dtype]


@PROPERTY
@given(sizes, sizes, st.integers(2, 6), head_dims, seeds, magnitudes)
def test_read_permutations_and_convex_hull(B, L, S, Dh, seed, mag):
    """Permuting slots changes nothing; permuting tokens permutes the output rows; every output
    lies in the box spanned by the slot values."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = randn(g, B, L, 2, Dh, mag=mag), randn(g, B, S, 2, Dh, mag=mag), randn(g, B, S, 2, Dh)
    o = functional.memory_read_attention(q, k, v)
    slots, tokens = torch.randperm(S, generator=g), torch.randperm(L, generator=g)
    torch.testing.assert_close(functional.memory_read_attention(q, k[:, slots], v[:, slots]), o)
    torch.testing.assert_close(functional.memory_read_attention(q[:, tokens], k, v), o[:, tokens])
    lo, hi = v.amin(dim=1, keepdim=True), v.amax(dim=1, keepdim=True)
    assert bool((o >= lo - 1e-12).all() and (o <= hi + 1e-12).all())


# ------------------------------------------------------------------ memory write


def write_oracle(q, k_self, v_self, k, v, mask, temperature, scale):
    """One SDPA query per slot over the keys ``[k_self_i, k_1 .. k_L]`` (no S x S anywhere)."""
    B, S, H, Dh = q.shape
    L = k.shape[1]
    q, k_self, v_self, k, v = (t.double() for t in (q, k_self, v_self, k, v))
    keys = torch.cat([k_self[:, :, :, None], k[:, None].expand(B, S, L, H, Dh).transpose(2, 3)], 3)
    vals = torch.cat([v_self[:, :, :, None], v[:, None].expand(B, S, L, H, Dh).transpose(2, 3)], 3)
    allowed = torch.ones(B, 1, 1, L + 1, dtype=torch.bool)
    if mask is not None:
        allowed[..., 1:] = mask[:, None, None, :]
    o = F.scaled_dot_product_attention(
        q.reshape(B * S, H, 1, Dh),
        keys.reshape(B * S, H, L + 1, Dh),
        vals.reshape(B * S, H, L + 1, Dh),
        attn_mask=allowed.repeat_interleave(S, dim=0),
        scale=scale / temperature,
    )
    return o.reshape(B, S, H, Dh)


def write_inputs(g: torch.Generator, B: int, S: int, L: int, H: int, Dh: int, mag: float):
    qs = [randn(g, B, S, H, Dh, mag=mag), randn(g, B, S, H, Dh, mag=mag), randn(g, B, S, H, Dh)]
    return (*qs, randn(g, B, L, H, Dh, mag=mag), randn(g, B, L, H, Dh))


@PROPERTY
@given(sizes, sizes, sizes, st.integers(1, 3), head_dims, seeds, magnitudes, dtypes,
       st.sampled_from([0.25, 0.5, 1.0, 3.0]), st.booleans())  # fmt: skip
def test_write_matches_attention_oracle(B, S, L, H, Dh, seed, mag, dtype, temperature, masked):
    g = torch.Generator().manual_seed(seed)
    args = [t.to(dtype) for t in write_inputs(g, B, S, L, H, Dh, mag)]
    mask = torch.rand(B, L, generator=g) > 0.4 if masked else None
    o = functional.memory_write_attention(
        *args, token_mask=mask, temperature=temperature, backend="reference"
    )
    assert o.shape == (B, S, H, Dh) and o.dtype == dtype
    expected = write_oracle(*args, mask, temperature, Dh**-0.5)
    assert relative_error(o, expected) < DTYPE_TOL[dtype]


@PROPERTY
@given(sizes, sizes, sizes, head_dims, seeds, magnitudes, dtypes)
def test_write_all_padding_row_is_v_self_exactly(B, S, L, Dh, seed, mag, dtype):
    g = torch.Generator().manual_seed(seed)
    args = [t.to(dtype) for t in write_inputs(g, B, S, L, 2, Dh, mag)]
    mask = torch.rand(B, L, generator=g) > 0.5
    mask[0] = False  # batch row 0 sees no real token
    o = functional.memory_write_attention(*args, token_mask=mask)
    assert torch.equal(o[0], args[2][0])
    assert not torch.isnan(o).any()


@PROPERTY
@given(sizes, sizes, st.integers(2, 7), head_dims, seeds, magnitudes)
def test_write_token_permutation_invariance_and_masked_tokens_ignored(B, S, L, Dh, seed, mag):
    """The write is a set function of the real tokens: their order does not matter, and neither
    do the keys and values at padded positions."""
    g = torch.Generator().manual_seed(seed)
    q, k_self, v_self, k, v = write_inputs(g, B, S, L, 2, Dh, mag)
    mask = torch.rand(B, L, generator=g) > 0.4
    o = functional.memory_write_attention(q, k_self, v_self, k, v, token_mask=mask)
    perm = torch.randperm(L, generator=g)
    permuted = functional.memory_write_attention(
        q, k_self, v_self, k[:, perm], v[:, perm], token_mask=mask[:, perm]
    )
    torch.testing.assert_close(permuted, o)
    pad = ~mask[:, :, None, None]
    k2 = torch.where(pad, randn(g, *k.shape, mag=100.0), k)
    v2 = torch.where(pad, randn(g, *v.shape, mag=100.0), v)
    torch.testing.assert_close(
        functional.memory_write_attention(q, k_self, v_self, k2, v2, token_mask=mask), o
    )
    keep = mask[0]  # dropping batch row 0's padded tokens equals masking them
    if keep.any():
        dropped = functional.memory_write_attention(
            q[:1], k_self[:1], v_self[:1], k[:1, keep], v[:1, keep]
        )
        torch.testing.assert_close(dropped, o[:1])


@PROPERTY
@given(sizes, sizes, head_dims, seeds, st.floats(0.1, 10.0), st.floats(0.1, 10.0))
def test_write_temperature_divides_the_scale(S, L, Dh, seed, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    args = write_inputs(g, 2, S, L, 2, Dh, 1.0)
    torch.testing.assert_close(
        functional.memory_write_attention(*args, temperature=temperature, scale=scale),
        functional.memory_write_attention(*args, temperature=1.0, scale=scale / temperature),
    )


# ------------------------------------------------------------------ gated memory update


def update_oracle(memory, candidate, bias, gate_logits, eps):
    memory, candidate, bias = memory.double(), candidate.double(), bias.double()
    if gate_logits is None:
        u = candidate + bias
    else:
        gate = torch.sigmoid(gate_logits.double())
        u = gate * candidate + (1 - gate) * memory + bias
    return F.normalize(u, dim=-1, eps=eps)


@PROPERTY
@given(sizes, sizes, st.integers(1, 40), seeds, magnitudes, dtypes, st.booleans())
def test_update_matches_formula_and_has_unit_norm(B, S, D, seed, mag, dtype, gated):
    g = torch.Generator().manual_seed(seed)
    m, c, gl = randn(g, B, S, D, mag=mag), randn(g, B, S, D, mag=mag), randn(g, B, S, D, mag=4.0)
    bias = randn(g, S, D, mag=mag)
    args = [t.to(dtype) for t in (m, c, bias)] + [gl.to(dtype) if gated else None]
    new = functional.gated_memory_update(*args, backend="reference")
    assert new.shape == (B, S, D) and new.dtype == dtype
    expected = update_oracle(*args, 1e-6)
    assert relative_error(new, expected) < DTYPE_TOL[dtype]
    norms = torch.linalg.vector_norm(new.double(), dim=-1)
    big = torch.linalg.vector_norm(expected, dim=-1) > 0.5  # every row here, unless eps bites
    assert big.all()
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=4 * DTYPE_TOL[dtype], rtol=0)


@PROPERTY
@given(sizes, sizes, st.integers(1, 40), seeds, st.floats(1e-3, 1e3))
def test_update_is_scale_invariant_and_a_closed_gate_keeps_the_slot(B, S, D, seed, alpha):
    """Scaling memory, candidate and bias together changes nothing (BMN normalises it away); a
    closed gate keeps the old slot (plus the bias); no gate is the paper's pure BMN."""
    g = torch.Generator().manual_seed(seed)
    m, c, gl, bias = randn(g, B, S, D), randn(g, B, S, D), randn(g, B, S, D), randn(g, S, D)
    new = functional.gated_memory_update(m, c, bias, gl)
    torch.testing.assert_close(
        functional.gated_memory_update(alpha * m, alpha * c, alpha * bias, gl), new
    )
    closed = functional.gated_memory_update(m, c, bias, torch.full_like(gl, -80.0))
    torch.testing.assert_close(closed, F.normalize(m + bias, dim=-1))
    torch.testing.assert_close(
        functional.gated_memory_update(m, c, bias), F.normalize(c + bias, dim=-1)
    )


@PROPERTY
@given(sizes, sizes, st.integers(1, 40), st.sampled_from([1e-6, 1e-3, 1.0]))
def test_update_of_zero_is_zero_not_nan(B, S, D, eps):
    zero = torch.zeros(B, S, D)
    new = functional.gated_memory_update(zero, zero, torch.zeros(S, D), zero, eps=eps)
    assert torch.equal(new, zero)


# ------------------------------------------------------------------ double backward


def _ops(dtype: torch.dtype) -> list[tuple[str, Callable[..., torch.Tensor], list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return [
        ("read", functional.memory_read_attention, [r(1, 3, 1, 4), r(1, 2, 1, 4), r(1, 2, 1, 4)]),
        (
            "write",
            functional.memory_write_attention,
            [r(1, 2, 1, 4), r(1, 2, 1, 4), r(1, 2, 1, 4), r(1, 3, 1, 4), r(1, 3, 1, 4)],
        ),
        ("update", functional.gated_memory_update, [r(1, 2, 4), r(1, 2, 4), r(2, 4), r(1, 2, 4)]),
    ]


@pytest.mark.parametrize("op", ["read", "write", "update"])
def test_double_backward_works_on_reference(op: str) -> None:
    _name, fn, inputs = next(o for o in _ops(torch.float64) if o[0] == op)
    assert torch.autograd.gradgradcheck(lambda *x: fn(*x, backend="reference"), inputs)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("op", ["read", "write", "update"])
def test_double_backward_on_triton_raises_clearly(op: str) -> None:
    _name, fn, inputs = next(o for o in _ops(torch.float32) if o[0] == op)
    out = fn(*inputs, backend="triton")
    first = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* not supported by backend='triton'"):
        sum(g.sum() for g in first).backward()
