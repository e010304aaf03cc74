"""Memory write: each of ``S`` slots attends over itself and the ``L`` tokens, never other slots.

``p = softmax(c * [q . k_self, q . k_1, ..., q . k_L])`` with ``c = scale / temperature`` and the
padded tokens left out; ``o = p_self * v_self + sum_j p_j v_j``.

The self entry is one extra logit per slot: the online softmax starts from it (``m = self logit``,
``l = 1``, ``acc = v_self``) instead of from ``-inf``, so no ``S x S`` matrix exists, every row has a
finite maximum from the start, and a slot that sees no real token ends with ``acc / l = v_self / 1``:
exactly ``v_self``.

Forward: one program per (block of slots, batch * head, token split). Memformer has few slots
(16-256) and long segments (up to 8192+ tokens), so the token axis is split across programs when
the slot blocks alone cannot fill the GPU (flash-decoding); ``memory_write_fwd_combine_kernel``
merges the partial softmax states in split order.

Backward:

- ``memory_write_bwd_dq_kernel``: per block of slots (and token split), ``dq`` over the tokens plus
  the self entry's ``dq``, ``dk_self``, ``dv_self`` and ``delta = rowsum(do * o)``.
- ``memory_write_bwd_dkdv_kernel``: per block of tokens, loops over all slots; ``dk``, ``dv``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memformer_fast.backends import accumulation_dtype, interpreter_enabled

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
def memory_write_fwd_kernel(
    q,
    k_self,
    v_self,
    k,
    v,
    token_mask,
    o,
    lse,
    l_part,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_ksd,
    stride_vsb,
    stride_vss,
    stride_vsh,
    stride_vsd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_mb,
    stride_ml,
    stride_on,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_lsen,
    H,
    S,
    L,
    Dh,
    chunk,
    logit_scale,
    HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """q, k_self, v_self: [B, S, H, Dh]; k, v: [B, L, H, Dh]; token_mask: [B, L] bool.

    Without SPLIT, o [1, B, S, H, Dh] and lse [1, B, H, S] are final. With SPLIT they are the
    per-split partial states, all ACC_DTYPE: o the unnormalised accumulators [num_splits, B, S, H,
    Dh], lse the running maxima and l_part the running sums [num_splits, B, H, S]. Grid:
    (cdiv(S, BLOCK_S), B * H, num_splits).
    """
    i_s, i_bh, i_n = (
        tl.program_id(0).to(tl.int64),
        tl.program_id(1).to(tl.int64),
        tl.program_id(2).to(tl.int64),
    )
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k_self += i_b * stride_ksb + i_h * stride_ksh
    v_self += i_b * stride_vsb + i_h * stride_vsh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    o += i_n * stride_on + i_b * stride_ob + i_h * stride_oh
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < S, o_d < Dh
    m_sd = m_s[:, None] & m_d[None, :]

    b_q = tl.load(q + o_s[:, None] * stride_qs + o_d[None, :] * stride_qd, mask=m_sd, other=0.0)
    p_ks = k_self + o_s[:, None] * stride_kss + o_d[None, :] * stride_ksd
    b_ks = tl.load(p_ks, mask=m_sd, other=0.0)
    p_vs = v_self + o_s[:, None] * stride_vss + o_d[None, :] * stride_vsd
    b_vs = tl.load(p_vs, mask=m_sd, other=0.0)
    b_self = tl.sum(b_q.to(ACC_DTYPE) * b_ks.to(ACC_DTYPE), 1) * logit_scale
    # The first split owns the self entry; the others start empty (m = -inf, l = 0, acc = 0).
    is_first = i_n == 0
    b_m = tl.where(is_first, b_self, float("-inf"))
    b_acc = tl.where(is_first, 1.0, 0.0).to(ACC_DTYPE) + tl.zeros([BLOCK_S], dtype=ACC_DTYPE)
    b_o = tl.where(is_first, b_vs.to(ACC_DTYPE), 0.0)

    l_start = i_n * chunk
    l_end = tl.minimum(l_start + chunk, L)
    for i_l in range(l_start, l_end, BLOCK_L):
        o_l = i_l + tl.arange(0, BLOCK_L)
        m_l = o_l < l_end
        if HAS_MASK:
            m_l = m_l & tl.load(
                token_mask + i_b * stride_mb + o_l * stride_ml, mask=m_l, other=0
            ).to(tl.int1)
        p_kT = k + o_d[:, None] * stride_kd + o_l[None, :] * stride_kl
        b_kT = tl.load(p_kT, mask=m_d[:, None] & m_l[None, :], other=0.0)
        p_v = v + o_l[:, None] * stride_vl + o_d[None, :] * stride_vd
        b_v = tl.load(p_v, mask=m_l[:, None] & m_d[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * logit_scale
        b_s = tl.where(m_l[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # Only a non-first split with no real token so far has m = -inf: subtract 0 there, not -inf.
        b_m_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp(b_s - b_m_ref[:, None])
        b_r = tl.exp(b_m - b_m_ref)
        b_acc = b_acc * b_r + tl.sum(b_p, 1)
        b_o = tl.dot(
            b_p.to(b_v.dtype),
            b_v,
            b_o * b_r[:, None],
            input_precision=DOT_PRECISION,
            out_dtype=ACC_DTYPE,
        )
        b_m = b_m_new

    p_o = o + o_s[:, None] * stride_os + o_d[None, :] * stride_od
    p_lse = lse + i_n * stride_lsen + i_bh * S + o_s
    if SPLIT:
        tl.store(p_o, b_o, mask=m_sd)
        tl.store(p_lse, b_m, mask=m_s)
        tl.store(l_part + i_n * stride_lsen + i_bh * S + o_s, b_acc, mask=m_s)
    else:
        tl.store(p_o, (b_o / b_acc[:, None]).to(o.dtype.element_ty), mask=m_sd)
        tl.store(p_lse, b_m + tl.log(b_acc), mask=m_s)


@triton.jit
def memory_write_fwd_combine_kernel(
    o_part,
    m_part,
    l_part,
    o,
    lse,
    stride_pn,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_pd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_mn,
    H,
    S,
    Dh,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Merges the split softmax states in split order. o_part: [num_splits, B, S, H, Dh]; m_part,
    l_part: [num_splits, B, H, S]; o: [B, S, H, Dh]; lse: [B, H, S]. Grid: (cdiv(S, BLOCK_S), B * H).
    """
    i_s, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < S, o_d < Dh
    m_sd = m_s[:, None] & m_d[None, :]

    p_op = (
        o_part
        + i_b * stride_pb
        + i_h * stride_ph
        + o_s[:, None] * stride_ps
        + o_d[None, :] * stride_pd
    )
    p_m = m_part + i_bh * S + o_s
    p_l = l_part + i_bh * S + o_s
    # Split 0 holds the self entry, so its maximum is finite and seeds the merge.
    b_m = tl.load(p_m, mask=m_s, other=0.0)
    b_l = tl.load(p_l, mask=m_s, other=1.0)
    b_o = tl.load(p_op, mask=m_sd, other=0.0)
    for i_n in range(1, num_splits):
        b_mi = tl.load(p_m + i_n * stride_mn, mask=m_s, other=0.0)
        b_li = tl.load(p_l + i_n * stride_mn, mask=m_s, other=0.0)
        b_oi = tl.load(p_op + i_n * stride_pn, mask=m_sd, other=0.0)
        b_m_new = tl.maximum(b_m, b_mi)
        b_r, b_ri = tl.exp(b_m - b_m_new), tl.exp(b_mi - b_m_new)
        b_l = b_l * b_r + b_li * b_ri
        b_o = b_o * b_r[:, None] + b_oi * b_ri[:, None]
        b_m = b_m_new

    p_o = (
        o + i_b * stride_ob + i_h * stride_oh + o_s[:, None] * stride_os + o_d[None, :] * stride_od
    )
    tl.store(p_o, (b_o / b_l[:, None]).to(o.dtype.element_ty), mask=m_sd)
    tl.store(lse + i_bh * S + o_s, (b_m + tl.log(b_l)).to(ACC_DTYPE), mask=m_s)


@triton.jit
def memory_write_bwd_dq_kernel(
    q,
    k_self,
    v_self,
    k,
    v,
    token_mask,
    o,
    do,
    lse,
    delta,
    dq,
    dk_self,
    dv_self,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_ksd,
    stride_vsb,
    stride_vss,
    stride_vsh,
    stride_vsd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_mb,
    stride_ml,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,
    stride_dqn,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_dqd,
    stride_dsb,
    stride_dss,
    stride_dsh,
    stride_dsd,
    H,
    S,
    L,
    Dh,
    chunk,
    logit_scale,
    HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dq: [num_splits, B, S, H, Dh] partials over token chunks; the first split also writes the
    self entry's share of dq, dk_self and dv_self ([B, S, H, Dh], one layout: stride_ds*) and
    delta [B, H, S]. Grid: (cdiv(S, BLOCK_S), B * H, num_splits).
    """
    i_s, i_bh, i_n = (
        tl.program_id(0).to(tl.int64),
        tl.program_id(1).to(tl.int64),
        tl.program_id(2).to(tl.int64),
    )
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k_self += i_b * stride_ksb + i_h * stride_ksh
    v_self += i_b * stride_vsb + i_h * stride_vsh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    o += i_b * stride_ob + i_h * stride_oh
    do += i_b * stride_dob + i_h * stride_doh
    dq += i_n * stride_dqn + i_b * stride_dqb + i_h * stride_dqh
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < S, o_d < Dh
    m_sd = m_s[:, None] & m_d[None, :]

    b_q = tl.load(q + o_s[:, None] * stride_qs + o_d[None, :] * stride_qd, mask=m_sd, other=0.0)
    # do and o come in the accumulation dtype (the output is rounded outside the op, see
    # memory_write_fwd); the dots take do in the input dtype, where it was exact anyway.
    p_do = do + o_s[:, None] * stride_dos + o_d[None, :] * stride_dod
    b_do = tl.load(p_do, mask=m_sd, other=0.0).to(ACC_DTYPE)
    b_lse = tl.load(lse + i_bh * S + o_s, mask=m_s, other=0.0)
    p_o = o + o_s[:, None] * stride_os + o_d[None, :] * stride_od
    b_delta = tl.sum(b_do * tl.load(p_o, mask=m_sd, other=0.0).to(ACC_DTYPE), 1)

    b_dq = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC_DTYPE)
    if i_n == 0:
        p_ks = k_self + o_s[:, None] * stride_kss + o_d[None, :] * stride_ksd
        b_ks = tl.load(p_ks, mask=m_sd, other=0.0).to(ACC_DTYPE)
        p_vs = v_self + o_s[:, None] * stride_vss + o_d[None, :] * stride_vsd
        b_vs = tl.load(p_vs, mask=m_sd, other=0.0).to(ACC_DTYPE)
        b_pself = tl.exp(tl.sum(b_q.to(ACC_DTYPE) * b_ks, 1) * logit_scale - b_lse)
        b_dsself = b_pself * (tl.sum(b_do * b_vs, 1) - b_delta)
        p_ds = (
            i_b * stride_dsb
            + i_h * stride_dsh
            + o_s[:, None] * stride_dss
            + o_d[None, :] * stride_dsd
        )
        tl.store(
            dk_self + p_ds,
            (b_dsself[:, None] * b_q.to(ACC_DTYPE) * logit_scale).to(dk_self.dtype.element_ty),
            mask=m_sd,
        )
        tl.store(
            dv_self + p_ds,
            (b_pself[:, None] * b_do).to(dv_self.dtype.element_ty),
            mask=m_sd,
        )
        tl.store(delta + i_bh * S + o_s, b_delta, mask=m_s)
        b_dq = b_dsself[:, None] * b_ks

    l_start = i_n * chunk
    l_end = tl.minimum(l_start + chunk, L)
    for i_l in range(l_start, l_end, BLOCK_L):
        o_l = i_l + tl.arange(0, BLOCK_L)
        m_l = o_l < l_end
        if HAS_MASK:
            m_l = m_l & tl.load(
                token_mask + i_b * stride_mb + o_l * stride_ml, mask=m_l, other=0
            ).to(tl.int1)
        m_dl = m_d[:, None] & m_l[None, :]
        b_kT = tl.load(
            k + o_d[:, None] * stride_kd + o_l[None, :] * stride_kl, mask=m_dl, other=0.0
        )
        b_vT = tl.load(
            v + o_d[:, None] * stride_vd + o_l[None, :] * stride_vl, mask=m_dl, other=0.0
        )
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * logit_scale
        b_p = tl.where(m_l[None, :], tl.exp(b_s - b_lse[:, None]), 0.0)
        b_dp = tl.dot(b_do.to(b_vT.dtype), b_vT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        b_dq = softmax_bwd_dq_tile(b_p, b_dp, b_delta, b_kT, b_dq, ACC_DTYPE)

    p_dq = dq + o_s[:, None] * stride_dqs + o_d[None, :] * stride_dqd
    tl.store(p_dq, (b_dq * logit_scale).to(dq.dtype.element_ty), mask=m_sd)


@triton.jit
def memory_write_bwd_dkdv_kernel(
    q,
    k,
    v,
    token_mask,
    do,
    lse,
    delta,
    dk,
    dv,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vl,
    stride_vh,
    stride_vd,
    stride_mb,
    stride_ml,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkl,
    stride_dkh,
    stride_dkd,
    H,
    S,
    L,
    Dh,
    logit_scale,
    HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dk, dv: [B, L, H, Dh] (one layout: stride_dk*); padded tokens get zeros. Each program owns a
    block of tokens and loops over every slot, so no reduction crosses programs.
    Grid: (cdiv(L, BLOCK_L), B * H).
    """
    i_l, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    q += i_b * stride_qb + i_h * stride_qh
    k += i_b * stride_kb + i_h * stride_kh
    v += i_b * stride_vb + i_h * stride_vh
    do += i_b * stride_dob + i_h * stride_doh
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_D)
    m_l, m_d = o_l < L, o_d < Dh
    m_ld = m_l[:, None] & m_d[None, :]
    m_tok = m_l
    if HAS_MASK:
        m_tok = m_tok & tl.load(
            token_mask + i_b * stride_mb + o_l * stride_ml, mask=m_l, other=0
        ).to(tl.int1)

    # Padded tokens are never read: whatever they hold (even NaN) cannot reach the gradients.
    m_tok_d = m_tok[:, None] & m_d[None, :]
    b_k = tl.load(k + o_l[:, None] * stride_kl + o_d[None, :] * stride_kd, mask=m_tok_d, other=0.0)
    b_v = tl.load(v + o_l[:, None] * stride_vl + o_d[None, :] * stride_vd, mask=m_tok_d, other=0.0)
    b_dk = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC_DTYPE)
    b_dv = tl.zeros([BLOCK_L, BLOCK_D], dtype=ACC_DTYPE)
    for i_s in range(0, S, BLOCK_S):
        o_s = i_s + tl.arange(0, BLOCK_S)
        m_s = o_s < S
        p_qT = q + o_d[:, None] * stride_qd + o_s[None, :] * stride_qs
        b_qT = tl.load(p_qT, mask=m_d[:, None] & m_s[None, :], other=0.0)
        p_do = do + o_s[:, None] * stride_dos + o_d[None, :] * stride_dod
        b_do = tl.load(p_do, mask=m_s[:, None] & m_d[None, :], other=0.0).to(b_v.dtype)
        b_lse = tl.load(lse + i_bh * S + o_s, mask=m_s, other=0.0)
        b_delta = tl.load(delta + i_bh * S + o_s, mask=m_s, other=0.0)
        # Tokens are the rows here: transposed probabilities [BLOCK_L, BLOCK_S].
        b_dk, b_dv = softmax_bwd_kv_tile(
            b_k, b_v, b_qT, b_do, b_lse, b_delta, m_tok[:, None] & m_s[None, :], logit_scale,
            b_dk, b_dv, ACC_DTYPE,
        )  # fmt: skip

    p_dk = (
        i_b * stride_dkb + i_h * stride_dkh + o_l[:, None] * stride_dkl + o_d[None, :] * stride_dkd
    )
    tl.store(dk + p_dk, (b_dk * logit_scale).to(dk.dtype.element_ty), mask=m_ld)
    tl.store(dv + p_dk, b_dv.to(dv.dtype.element_ty), mask=m_ld)


# (kernel, bits per element) -> {padded head dim: (BLOCK_L, BLOCK_S, num_warps)}, num_stages 2.
# Found by compiling candidates with the JIT's own specialisations (aligned and odd shapes) under
# triton 3.6 and 3.9, largest tiles first, and keeping the first with no register spill on any:
# _CONFIGS for sm_90, _SM80_CONFIGS for the entries that spill on sm_80 (taken below compute
# capability 9.0). tests/test_aot_compile.py re-checks every entry for both targets in CI.
_CONFIGS: AttentionConfigs = {
    ("fwd", 16): {16: (128, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (32, 64, 8)},
    ("fwd", 32): {16: (64, 32, 8), 32: (64, 32, 8), 64: (32, 32, 4), 128: (32, 16, 8)},
    ("bwd_dq", 16): {16: (128, 64, 8), 32: (64, 64, 8), 64: (64, 64, 8), 128: (32, 16, 8)},
    ("bwd_dq", 32): {16: (64, 16, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (32, 16, 8)},
    ("bwd_dkdv", 16): {16: (128, 64, 8), 32: (64, 32, 8), 64: (32, 64, 8), 128: (64, 32, 8)},
    ("bwd_dkdv", 32): {16: (64, 32, 8), 32: (32, 32, 8), 64: (32, 32, 8), 128: (32, 16, 8)},
}
_SM80_CONFIGS: AttentionConfigs = {
    ("fwd", 16): {32: (64, 32, 8), 64: (128, 32, 4), 128: (128, 16, 4)},
    ("fwd", 32): {32: (32, 64, 8)},
    ("bwd_dq", 16): {64: (128, 32, 4)},
    ("bwd_dq", 32): {32: (32, 64, 8), 64: (32, 64, 8)},
    ("bwd_dkdv", 16): {64: (32, 32, 8), 128: (32, 64, 8)},
    ("bwd_dkdv", 32): {16: (128, 16, 8)},
}


def memory_write_config(kernel: str, dtype: torch.dtype, Dh: int) -> dict[str, int]:
    """Tiles and launch options of ``kernel`` ("fwd", "fwd_combine", "bwd_dq" or "bwd_dkdv"),
    from ``_CONFIGS`` (``_SM80_CONFIGS`` below sm_90; the split combine has fixed ones)."""
    BLOCK_D = head_dim_tile("memory_write_attention", Dh)
    if kernel == "fwd_combine":
        return {"BLOCK_S": 16, "BLOCK_D": BLOCK_D} | (
            {} if interpreter_enabled() else {"num_warps": 4}
        )
    return attention_tiles(_CONFIGS, _SM80_CONFIGS, kernel, dtype, BLOCK_D)


def _mask_args(token_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, int, int]:
    return (None, 0, 0) if token_mask is None else (token_mask, *token_mask.stride())


def memory_write_fwd(
    q: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None,
    temperature: float,
    scale: float,
    num_splits: int | None = None,
    *,
    wrap: KernelWrapper = launch_directly,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k_self, v_self: [B, S, H, Dh]; k, v: [B, L, H, Dh]; token_mask: [B, L] bool or None
    (any strides) -> (o [B, S, H, Dh], lse [B, H, S] over the 1 + L entries), both float32.

    The output stays in float32 (float64 for float64 inputs): the caller rounds it to the input
    dtype, and the backward computes ``delta = rowsum(do * o)`` from the unrounded one (a float16
    o doubles the error of the gradients; S slots make this output small).
    ``num_splits`` forces how many programs share the token axis (tests); ``wrap`` is applied to
    each kernel before its launch.
    """
    B, S, H, Dh = q.shape
    L = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    cfg = memory_write_config("fwd", q.dtype, Dh)
    n_s = triton.cdiv(S, cfg["BLOCK_S"])
    splits, chunk = split_reduction(L, cfg["BLOCK_L"], n_s * B * H, q.device, num_splits)
    o = torch.empty((B, S, H, Dh), dtype=acc, device=q.device)
    lse = torch.empty((B, H, S), dtype=acc, device=q.device)
    if splits == 1:
        o_part, m_part, l_part = o[None], lse[None], None
    else:
        o_part = torch.empty((splits, B, S, H, Dh), dtype=acc, device=q.device)
        m_part = torch.empty((splits, B, H, S), dtype=acc, device=q.device)
        l_part = torch.empty_like(m_part)
    wrap(memory_write_fwd_kernel)[(n_s, B * H, splits)](
        q, k_self, v_self, k, v, token_mask, o_part, m_part, l_part,
        *q.stride(), *k_self.stride(), *v_self.stride(), *k.stride(), *v.stride(),
        *_mask_args(token_mask)[1:], *o_part.stride(), m_part.stride(0),
        H, S, L, Dh, chunk, scale / temperature,
        HAS_MASK=token_mask is not None, SPLIT=splits > 1, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip
    if splits > 1:
        cfg = memory_write_config("fwd_combine", q.dtype, Dh)
        wrap(memory_write_fwd_combine_kernel)[(triton.cdiv(S, cfg["BLOCK_S"]), B * H)](
            o_part, m_part, l_part, o, lse, *o_part.stride(), *o.stride(), m_part.stride(0),
            H, S, Dh, splits, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
        )  # fmt: skip
    return o, lse


def memory_write_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None,
    o: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    scale: float,
    num_splits: int | None = None,
    *,
    wrap: KernelWrapper = launch_directly,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk_self, dv_self, dk, dv) of :func:`memory_write_fwd` for ``do``; ``o`` and
    ``do`` are float32 like the forward's output.

    ``num_splits`` forces how many programs share the token axis of the dq reduction (tests);
    ``wrap`` is applied to each kernel before its launch.
    """
    B, S, H, Dh = q.shape
    L = k.shape[1]
    logit_scale = scale / temperature
    mask, stride_mb, stride_ml = _mask_args(token_mask)
    dk_self = torch.empty((B, S, H, Dh), dtype=q.dtype, device=q.device)
    dv_self = torch.empty_like(dk_self)
    delta = torch.empty_like(lse)
    cfg = memory_write_config("bwd_dq", q.dtype, Dh)
    n_s = triton.cdiv(S, cfg["BLOCK_S"])
    splits, chunk = split_reduction(L, cfg["BLOCK_L"], n_s * B * H, q.device, num_splits)
    dq = torch.empty(
        (splits, B, S, H, Dh),
        dtype=q.dtype if splits == 1 else accumulation_dtype(q.dtype),
        device=q.device,
    )
    wrap(memory_write_bwd_dq_kernel)[(n_s, B * H, splits)](
        q, k_self, v_self, k, v, mask, o, do, lse, delta, dq, dk_self, dv_self,
        *q.stride(), *k_self.stride(), *v_self.stride(), *k.stride(), *v.stride(),
        stride_mb, stride_ml, *o.stride(), *do.stride(), *dq.stride(), *dk_self.stride(),
        H, S, L, Dh, chunk, logit_scale,
        HAS_MASK=token_mask is not None, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip
    # The partials are summed in split order: deterministic, unlike atomics.
    dq = dq[0] if splits == 1 else dq.sum(0).to(q.dtype)

    dk = torch.empty((B, L, H, Dh), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    cfg = memory_write_config("bwd_dkdv", q.dtype, Dh)
    wrap(memory_write_bwd_dkdv_kernel)[(triton.cdiv(L, cfg["BLOCK_L"]), B * H)](
        q, k, v, mask, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), stride_mb, stride_ml, *do.stride(), *dk.stride(),
        H, S, L, Dh, logit_scale,
        HAS_MASK=token_mask is not None, **cfg, ACC_DTYPE=acc_dtype(q.dtype),
    )  # fmt: skip
    return dq, dk_self, dv_self, dk, dv
