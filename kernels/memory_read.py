"""Memory read: ``L`` token queries attend over ``S`` memory slots, per head, with no mask.

``o[b, n, h] = softmax_j(scale * q[b, n, h] . k[b, j, h]) @ v[b, :, h]``

Forward: one program per (block of ``BLOCK_L`` queries, batch * head) streams the slots in tiles of
``BLOCK_S`` with an online softmax and saves the log-sum-exp of every query row.

Backward (no ``L x S`` matrix ever reaches global memory):

- ``memory_read_bwd_dq_kernel``: per block of queries, loops over the slots; writes ``dq`` and
  ``delta = rowsum(p * dp)`` (``= rowsum(do * o)`` before rounding), the softmax-backward term the
  dk/dv kernel reuses. The output is not needed.
- ``memory_read_bwd_dkdv_kernel``: per block of slots, loops over the queries and accumulates
  ``dk``/``dv`` in registers, deterministically. When there are too few slot blocks to fill the GPU
  (``S`` is typically 16-256), the query axis is split across programs into float32 partials that
  are summed in a fixed order afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memformer_fast.backends import accumulation_dtype

from .utils import (
    DOT_PRECISION,
    AttentionConfigs,
    KernelWrapper,
    acc_dtype,
    attention_tiles,
    head_dim_tile,
    launch_directly,
    softmax_bwd_dq_tile,
    softmax_bwd_kv_tile,
    split_reduction,
)


@triton.jit
def memory_read_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    H,
    L,
    S,
    Dh,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """q, o: [B, L, H, Dh]; k, v: [B, S, H, Dh]; lse: [B, H, L] (ACC_DTYPE). Grid: (cdiv(L, BLOCK_L), B * H)."""
    i_l, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    o += i_b * stride_ob + i_h * stride_oh
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_D)
    m_l, m_d = o_l < L, o_d < Dh
    m_ld = m_l[:, None] & m_d[None, :]

    b_q = tl.load(q + o_l[:, None] * stride_ql + o_d[None, :] * stride_qd, mask=m_ld, other=0.0)
    b_m = tl.full([BLOCK_L], float("-inf"), dtype=ACC_DTYPE)
    b_acc = tl.zeros([BLOCK_L], dtype=ACC_DTYPE)
    b_o = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC_DTYPE)
    for i_s in range(0, S, BLOCK_S):
        o_s = i_s + tl.arange(0, BLOCK_S)
        m_s = o_s < S
        # k is loaded transposed ([BLOCK_D, BLOCK_S]) so the logits are a plain q @ kT.
        p_kT = k + o_d[:, None] * stride_kd + o_s[None, :] * stride_ks
        b_kT = tl.load(p_kT, mask=m_d[:, None] & m_s[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
        b_s = tl.where(m_s[None, :], b_s, float("-inf"))
        # Every tile holds at least one real slot, so b_m_new is finite from the first tile on.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_r = tl.exp(b_m - b_m_new)
        b_acc = b_acc * b_r + tl.sum(b_p, 1)
        p_v = v + o_s[:, None] * stride_vs + o_d[None, :] * stride_vd
        b_v = tl.load(p_v, mask=m_s[:, None] & m_d[None, :], other=0.0)
        b_o = b_o * b_r[:, None]
        b_o = tl.dot(
            b_p.to(b_v.dtype), b_v, b_o, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
        )
        b_m = b_m_new
    b_o = b_o / b_acc[:, None]

    p_o = o + o_l[:, None] * stride_ol + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_ld)
    tl.store(lse + i_bh * L + o_l, b_m + tl.log(b_acc), mask=m_l)


@triton.jit
def _memory_read_bwd_tile(
    b_q,
    b_do,
    b_lse,
    k,
    v,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    i_s,
    S,
    Dh,
    scale,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """For the slot tile at ``i_s`` (k, v offset to the program's batch and head): probabilities
    p and dp = do @ v^T [BLOCK_L, BLOCK_S], and kT."""
    o_s = i_s + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < S
    m_kvT = (o_d < Dh)[:, None] & m_s[None, :]
    b_kT = tl.load(k + o_d[:, None] * stride_kd + o_s[None, :] * stride_ks, mask=m_kvT, other=0.0)
    b_vT = tl.load(v + o_d[:, None] * stride_vd + o_s[None, :] * stride_vs, mask=m_kvT, other=0.0)
    b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
    b_p = tl.where(m_s[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, b_vT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return b_p, b_dp, b_kT


@triton.jit
def memory_read_bwd_dq_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dq,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dql,
    stride_dqh,
    stride_dqd,
    H,
    L,
    S,
    Dh,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dq: [B, L, H, Dh]; writes delta = rowsum(p * dp) [B, H, L] for the dk/dv kernel.

    delta is computed from the probabilities, not as rowsum(do * o) from the rounded output: with a
    float16 o that shortcut doubles the error of the gradients. Memory has few slots, so a single
    slot tile (the common case) gets it for free; more slots take a first pass over the slots.
    Grid: (cdiv(L, BLOCK_L), B * H).
    """
    i_l, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    do += i_b * stride_dob + i_h * stride_doh
    dq += i_b * stride_dqb + i_h * stride_dqh
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_D)
    m_l, m_d = o_l < L, o_d < Dh
    m_ld = m_l[:, None] & m_d[None, :]

    b_q = tl.load(q + o_l[:, None] * stride_ql + o_d[None, :] * stride_qd, mask=m_ld, other=0.0)
    b_do = tl.load(do + o_l[:, None] * stride_dol + o_d[None, :] * stride_dod, mask=m_ld, other=0.0)
    b_lse = tl.load(lse + i_bh * L + o_l, mask=m_l, other=0.0)

    if S <= BLOCK_S:
        b_p, b_dp, b_kT = _memory_read_bwd_tile(
            b_q, b_do, b_lse, k, v, stride_ks, stride_kd, stride_vs, stride_vd, 0, S, Dh, scale,
            BLOCK_S, BLOCK_D, ACC_DTYPE,
        )  # fmt: skip
        b_delta = tl.sum(b_p * b_dp, 1)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(
            b_ds.to(b_kT.dtype), tl.trans(b_kT), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
        )
    else:
        b_delta = tl.zeros([BLOCK_L], dtype=ACC_DTYPE)
        for i_s in range(0, S, BLOCK_S):
            b_p, b_dp, b_kT = _memory_read_bwd_tile(
                b_q, b_do, b_lse, k, v, stride_ks, stride_kd, stride_vs, stride_vd, i_s, S, Dh, scale,
                BLOCK_S, BLOCK_D, ACC_DTYPE,
            )  # fmt: skip
            b_delta += tl.sum(b_p * b_dp, 1)
        b_dq = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC_DTYPE)
        for i_s in range(0, S, BLOCK_S):
            b_p, b_dp, b_kT = _memory_read_bwd_tile(
                b_q, b_do, b_lse, k, v, stride_ks, stride_kd, stride_vs, stride_vd, i_s, S, Dh, scale,
                BLOCK_S, BLOCK_D, ACC_DTYPE,
            )  # fmt: skip
            b_dq = softmax_bwd_dq_tile(b_p, b_dp, b_delta, b_kT, b_dq, ACC_DTYPE)

    tl.store(delta + i_bh * L + o_l, b_delta, mask=m_l)
    p_dq = dq + o_l[:, None] * stride_dql + o_d[None, :] * stride_dqd
    tl.store(p_dq, (b_dq * scale).to(dq.dtype.element_ty), mask=m_ld)


@triton.jit
def memory_read_bwd_dkdv_kernel(
    q,
    k,
    v,
    do,
    lse,
    delta,
    dk,
    dv,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_dkn,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dkd,
    stride_dvn,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dvd,
    H,
    L,
    S,
    Dh,
    chunk,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dk, dv: [num_splits, B, S, H, Dh] partial sums over query chunks of length ``chunk``.

    Grid: (cdiv(S, BLOCK_S), B * H, num_splits).
    """
    i_s, i_bh, i_n = (
        tl.program_id(0).to(tl.int64),
        tl.program_id(1).to(tl.int64),
        tl.program_id(2).to(tl.int64),
    )
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    do += i_b * stride_dob + i_h * stride_doh
    dk += i_n * stride_dkn + i_b * stride_dkb + i_h * stride_dkh
    dv += i_n * stride_dvn + i_b * stride_dvb + i_h * stride_dvh
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < S, o_d < Dh
    m_sd = m_s[:, None] & m_d[None, :]

    b_k = tl.load(k + o_s[:, None] * stride_ks + o_d[None, :] * stride_kd, mask=m_sd, other=0.0)
    b_v = tl.load(v + o_s[:, None] * stride_vs + o_d[None, :] * stride_vd, mask=m_sd, other=0.0)
    b_dk = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC_DTYPE)
    b_dv = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC_DTYPE)
    l_start = i_n * chunk
    l_end = tl.minimum(l_start + chunk, L)
    for i_l in range(l_start, l_end, BLOCK_L):
        o_l = i_l + tl.arange(0, BLOCK_L)
        m_l = o_l < l_end
        p_qT = q + o_d[:, None] * stride_qd + o_l[None, :] * stride_ql
        b_qT = tl.load(p_qT, mask=m_d[:, None] & m_l[None, :], other=0.0)
        p_do = do + o_l[:, None] * stride_dol + o_d[None, :] * stride_dod
        b_do = tl.load(p_do, mask=m_l[:, None] & m_d[None, :], other=0.0)
        b_lse = tl.load(lse + i_bh * L + o_l, mask=m_l, other=0.0)
        b_delta = tl.load(delta + i_bh * L + o_l, mask=m_l, other=0.0)
        b_dk, b_dv = softmax_bwd_kv_tile(
            b_k, b_v, b_qT, b_do, b_lse, b_delta, m_l[None, :], scale, b_dk, b_dv, ACC_DTYPE
        )

    p_dk = dk + o_s[:, None] * stride_dks + o_d[None, :] * stride_dkd
    p_dv = dv + o_s[:, None] * stride_dvs + o_d[None, :] * stride_dvd
    tl.store(p_dk, (b_dk * scale).to(dk.dtype.element_ty), mask=m_sd)
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_sd)


# (kernel, bits per element) -> {padded head dim: (BLOCK_L, BLOCK_S, num_warps)}, num_stages 2.
# Found by compiling candidates with the JIT's own specialisations (aligned and odd shapes) under
# triton 3.6 and 3.9, largest tiles first, and keeping the first with no register spill on any:
# _CONFIGS for sm_90, _SM80_CONFIGS for the entries that spill on sm_80 (taken below compute
# capability 9.0). tests/test_aot_compile.py re-checks every entry for both targets in CI.
_CONFIGS: AttentionConfigs = {
    ("fwd", 16): {16: (128, 64, 8), 32: (128, 64, 8), 64: (128, 64, 8), 128: (64, 64, 8)},
    ("fwd", 32): {16: (64, 32, 8), 32: (32, 32, 8), 64: (64, 32, 8), 128: (32, 32, 8)},
    ("bwd_dq", 16): {16: (128, 64, 8), 32: (128, 64, 8), 64: (64, 64, 8), 128: (64, 32, 8)},
    ("bwd_dq", 32): {16: (64, 32, 8), 32: (64, 16, 8), 64: (64, 32, 8), 128: (32, 16, 8)},
    ("bwd_dkdv", 16): {16: (64, 64, 8), 32: (32, 64, 8), 64: (64, 32, 8), 128: (64, 32, 8)},
    ("bwd_dkdv", 32): {16: (64, 32, 8), 32: (32, 16, 4), 64: (32, 32, 8), 128: (16, 32, 8)},
}
_SM80_CONFIGS: AttentionConfigs = {
    ("fwd", 32): {64: (128, 16, 8)},
    ("bwd_dq", 16): {16: (128, 64, 4), 64: (128, 32, 8), 128: (32, 64, 8)},
    ("bwd_dq", 32): {16: (64, 16, 8)},
}


def memory_read_config(kernel: str, dtype: torch.dtype, Dh: int) -> dict[str, int]:
    """Tiles and launch options of ``kernel`` ("fwd", "bwd_dq" or "bwd_dkdv"), from ``_CONFIGS``
    (``_SM80_CONFIGS`` below sm_90)."""
    return attention_tiles(
        _CONFIGS, _SM80_CONFIGS, kernel, dtype, head_dim_tile("memory_read_attention", Dh)
    )


def memory_read_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    wrap: KernelWrapper = launch_directly,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, L, H, Dh]; k, v: [B, S, H, Dh] (any strides) -> (o [B, L, H, Dh], lse [B, H, L]).
    ``wrap`` is applied to the kernel before its launch."""
    B, L, H, Dh = q.shape
    S = k.shape[1]
    o = torch.empty((B, L, H, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=accumulation_dtype(q.dtype), device=q.device)
    cfg = memory_read_config("fwd", q.dtype, Dh)
    grid = (triton.cdiv(L, cfg["BLOCK_L"]), B * H)
    wrap(memory_read_fwd_kernel)[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, L, S, Dh, scale, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip
    return o, lse


def memory_read_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    *,
    wrap: KernelWrapper = launch_directly,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`memory_read_fwd` for the upstream gradient ``do``.

    ``num_splits`` forces how many programs share the query axis of the dk/dv reduction (tests);
    ``wrap`` is applied to each kernel before its launch.
    """
    B, L, H, Dh = q.shape
    S = k.shape[1]
    dq = torch.empty((B, L, H, Dh), dtype=q.dtype, device=q.device)
    delta = torch.empty_like(lse)
    cfg = memory_read_config("bwd_dq", q.dtype, Dh)
    grid = (triton.cdiv(L, cfg["BLOCK_L"]), B * H)
    wrap(memory_read_bwd_dq_kernel)[grid](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, L, S, Dh, scale, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip

    cfg = memory_read_config("bwd_dkdv", q.dtype, Dh)
    n_s = triton.cdiv(S, cfg["BLOCK_S"])
    splits, chunk = split_reduction(L, cfg["BLOCK_L"], n_s * B * H, q.device, num_splits)
    if splits == 1:
        dk = torch.empty((1, B, S, H, Dh), dtype=k.dtype, device=k.device)
        dv = torch.empty((1, B, S, H, Dh), dtype=v.dtype, device=v.device)
    else:
        acc = accumulation_dtype(q.dtype)
        dk = torch.empty((splits, B, S, H, Dh), dtype=acc, device=k.device)
        dv = torch.empty((splits, B, S, H, Dh), dtype=acc, device=v.device)
    wrap(memory_read_bwd_dkdv_kernel)[(n_s, B * H, splits)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, L, S, Dh, chunk, scale, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip
    if splits == 1:
        return dq, dk[0], dv[0]
    # The partials are summed in split order: deterministic, unlike atomics.
    return dq, dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
