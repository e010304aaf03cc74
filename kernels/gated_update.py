"""Gated memory update with biased memory normalisation (BMN), one pass over every input.

``g = sigmoid(gate_logits)`` (1 without a gate), ``u = g * candidate + (1 - g) * memory + bias``,
``new = u / max(||u||_2, eps)`` over the model width ``D`` of each slot.

Forward: one program per block of ``BLOCK_R`` (batch, slot) rows, the whole width ``D`` in one tile.
Backward: one program per (block of slots, batch chunk) recomputes ``u`` (cheaper than saving it)
and loops over its batch items, so the gradient of the shared ``bias`` is summed in registers; when
the slot blocks alone cannot fill the GPU the batch is split into float32 partials that are summed
in a fixed order afterwards. No atomics: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memformer_fast.backends import MAX_GATED_WIDTH as MAX_WIDTH
from memformer_fast.backends import accumulation_dtype, interpreter_enabled

from .utils import KernelWrapper, acc_dtype, launch_directly, split_reduction


@triton.jit
def gated_update_fwd_kernel(
    memory,
    candidate,
    bias,
    gate_logits,
    out,
    stride_mb,
    stride_ms,
    stride_md,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_bs,
    stride_bd,
    stride_gb,
    stride_gs,
    stride_gd,
    stride_ob,
    stride_os,
    stride_od,
    S,
    R,
    D,
    eps,
    HAS_GATE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """memory, candidate, gate_logits, out: [B, S, D]; bias: [S, D]; R = B * S rows.
    Grid: (cdiv(R, BLOCK_R),)."""
    i_r = tl.program_id(0).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, BLOCK_D)
    m_rd = (o_r < R)[:, None] & (o_d < D)[None, :]
    o_b, o_s = o_r // S, o_r % S

    p_c = candidate + o_b[:, None] * stride_cb + o_s[:, None] * stride_cs + o_d[None, :] * stride_cd
    p_bias = bias + o_s[:, None] * stride_bs + o_d[None, :] * stride_bd
    b_c = tl.load(p_c, mask=m_rd, other=0.0).to(ACC_DTYPE)
    b_bias = tl.load(p_bias, mask=m_rd, other=0.0).to(ACC_DTYPE)
    if HAS_GATE:
        p_m = (
            memory + o_b[:, None] * stride_mb + o_s[:, None] * stride_ms + o_d[None, :] * stride_md
        )
        p_g = (
            gate_logits
            + o_b[:, None] * stride_gb
            + o_s[:, None] * stride_gs
            + o_d[None, :] * stride_gd
        )
        b_m = tl.load(p_m, mask=m_rd, other=0.0).to(ACC_DTYPE)
        b_g = tl.sigmoid(tl.load(p_g, mask=m_rd, other=0.0).to(ACC_DTYPE))
        b_u = b_g * b_c + (1 - b_g) * b_m + b_bias
    else:
        b_u = b_c + b_bias
    b_norm = tl.maximum(tl.sqrt(tl.sum(b_u * b_u, 1)), eps)

    p_o = out + o_b[:, None] * stride_ob + o_s[:, None] * stride_os + o_d[None, :] * stride_od
    tl.store(p_o, (b_u / b_norm[:, None]).to(out.dtype.element_ty), mask=m_rd)


@triton.jit
def gated_update_bwd_kernel(
    dout,
    memory,
    candidate,
    bias,
    gate_logits,
    dmemory,
    dcandidate,
    dbias,
    dgate_logits,
    stride_dob,
    stride_dos,
    stride_dod,
    stride_mb,
    stride_ms,
    stride_md,
    stride_cb,
    stride_cs,
    stride_cd,
    stride_bs,
    stride_bd,
    stride_gb,
    stride_gs,
    stride_gd,
    stride_gradb,
    stride_grads,
    stride_gradd,
    stride_dbn,
    stride_dbs,
    stride_dbd,
    B,
    S,
    D,
    chunk,
    eps,
    HAS_GATE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dout: [B, S, D]; dmemory, dcandidate, dgate_logits: [B, S, D] (one layout: stride_grad*);
    dbias: [num_splits, S, D] partial sums over batch chunks of length ``chunk``.
    Grid: (cdiv(S, BLOCK_S), num_splits)."""
    i_s, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_sd = (o_s < S)[:, None] & (o_d < D)[None, :]

    b_bias = tl.load(
        bias + o_s[:, None] * stride_bs + o_d[None, :] * stride_bd, mask=m_sd, other=0.0
    ).to(ACC_DTYPE)
    b_dbias = tl.zeros([BLOCK_S, BLOCK_D], dtype=ACC_DTYPE)
    for i_b in range(i_n * chunk, tl.minimum(i_n * chunk + chunk, B)):
        p_do = dout + i_b * stride_dob + o_s[:, None] * stride_dos + o_d[None, :] * stride_dod
        p_c = candidate + i_b * stride_cb + o_s[:, None] * stride_cs + o_d[None, :] * stride_cd
        b_do = tl.load(p_do, mask=m_sd, other=0.0).to(ACC_DTYPE)
        b_c = tl.load(p_c, mask=m_sd, other=0.0).to(ACC_DTYPE)
        if HAS_GATE:
            p_m = memory + i_b * stride_mb + o_s[:, None] * stride_ms + o_d[None, :] * stride_md
            p_g = (
                gate_logits + i_b * stride_gb + o_s[:, None] * stride_gs + o_d[None, :] * stride_gd
            )
            b_m = tl.load(p_m, mask=m_sd, other=0.0).to(ACC_DTYPE)
            b_g = tl.sigmoid(tl.load(p_g, mask=m_sd, other=0.0).to(ACC_DTYPE))
            b_u = b_g * b_c + (1 - b_g) * b_m + b_bias
        else:
            b_u = b_c + b_bias
        b_norm = tl.sqrt(tl.sum(b_u * b_u, 1))
        # Below eps the norm is the constant eps (torch's clamp_min passes no gradient there).
        b_clamped = b_norm < eps
        b_norm = tl.maximum(b_norm, eps)
        b_y = b_u / b_norm[:, None]
        b_proj = tl.where(b_clamped, 0.0, tl.sum(b_do * b_y, 1))
        b_du = (b_do - b_y * b_proj[:, None]) / b_norm[:, None]
        b_dbias += b_du

        p_grad = i_b * stride_gradb + o_s[:, None] * stride_grads + o_d[None, :] * stride_gradd
        if HAS_GATE:
            tl.store(dcandidate + p_grad, (b_g * b_du).to(dcandidate.dtype.element_ty), mask=m_sd)
            tl.store(dmemory + p_grad, ((1 - b_g) * b_du).to(dmemory.dtype.element_ty), mask=m_sd)
            b_dg = b_du * (b_c - b_m) * b_g * (1 - b_g)
            tl.store(dgate_logits + p_grad, b_dg.to(dgate_logits.dtype.element_ty), mask=m_sd)
        else:
            tl.store(dcandidate + p_grad, b_du.to(dcandidate.dtype.element_ty), mask=m_sd)

    p_db = dbias + i_n * stride_dbn + o_s[:, None] * stride_dbs + o_d[None, :] * stride_dbd
    tl.store(p_db, b_dbias.to(dbias.dtype.element_ty), mask=m_sd)


def gated_update_config(kernel: str, D: int) -> dict[str, int]:
    """Tiles and launch options of ``kernel`` ("fwd" or "bwd").

    A program holds whole slots (2048 elements in the forward, 1024 in the backward, which keeps
    about eight tiles live per batch item) spread over enough warps that each thread owns at most
    eight elements of a tile: no register spills up to ``MAX_WIDTH`` (checked ahead of time in CI).
    """
    D = int(D)  # traced with dynamic shapes: the tiles specialise the graph on the width
    if D > MAX_WIDTH:
        raise ValueError(f"gated_memory_update kernels support a width D <= {MAX_WIDTH}, got {D}")
    BLOCK_D = triton.next_power_of_2(D)
    elements = 2048 if kernel == "fwd" else 1024
    rows = max(1, elements // BLOCK_D)
    if interpreter_enabled():
        return {"BLOCK_R" if kernel == "fwd" else "BLOCK_S": min(rows, 4), "BLOCK_D": BLOCK_D}
    num_warps = max(4, min(16, rows * BLOCK_D // (256 if kernel == "fwd" else 128)))
    return {
        "BLOCK_R" if kernel == "fwd" else "BLOCK_S": rows,
        "BLOCK_D": BLOCK_D,
        "num_warps": num_warps,
    }


def gated_update_fwd(
    memory: torch.Tensor,
    candidate: torch.Tensor,
    bias: torch.Tensor,
    gate_logits: torch.Tensor | None,
    eps: float,
    *,
    wrap: KernelWrapper = launch_directly,
) -> torch.Tensor:
    """memory, candidate: [B, S, D]; bias: [S, D]; gate_logits: [B, S, D] or None (any strides)
    -> new memory [B, S, D]. ``wrap`` is applied to the kernel before its launch."""
    B, S, D = memory.shape
    out = torch.empty((B, S, D), dtype=memory.dtype, device=memory.device)
    g_strides = (0, 0, 0) if gate_logits is None else gate_logits.stride()
    cfg = gated_update_config("fwd", D)
    wrap(gated_update_fwd_kernel)[(triton.cdiv(B * S, cfg["BLOCK_R"]),)](
        memory, candidate, bias, gate_logits, out,
        *memory.stride(), *candidate.stride(), *bias.stride(), *g_strides, *out.stride(),
        S, B * S, D, eps,
        HAS_GATE=gate_logits is not None, **cfg, ACC_DTYPE=acc_dtype(memory.dtype),
    )  # fmt: skip
    return out


def gated_update_bwd(
    dout: torch.Tensor,
    memory: torch.Tensor,
    candidate: torch.Tensor,
    bias: torch.Tensor,
    gate_logits: torch.Tensor | None,
    eps: float,
    num_splits: int | None = None,
    *,
    wrap: KernelWrapper = launch_directly,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (d_memory, d_candidate, d_bias, d_gate_logits) of :func:`gated_update_fwd`.

    Without a gate the memory does not reach the output: d_memory and d_gate_logits are None.
    ``num_splits`` forces how many programs share the batch axis of the bias reduction (tests);
    ``wrap`` is applied to the kernel before its launch.
    """
    B, S, D = memory.shape
    has_gate = gate_logits is not None
    dcandidate = torch.empty((B, S, D), dtype=candidate.dtype, device=candidate.device)
    dmemory = torch.empty_like(dcandidate) if has_gate else None
    dgate = torch.empty_like(dcandidate) if has_gate else None
    cfg = gated_update_config("bwd", D)
    n_s = triton.cdiv(S, cfg["BLOCK_S"])
    splits, chunk = split_reduction(B, 1, n_s, memory.device, num_splits)
    acc = accumulation_dtype(memory.dtype)
    dbias = torch.empty(
        (splits, S, D), dtype=bias.dtype if splits == 1 else acc, device=bias.device
    )
    g_strides = (0, 0, 0) if gate_logits is None else gate_logits.stride()
    wrap(gated_update_bwd_kernel)[(n_s, splits)](
        dout, memory, candidate, bias, gate_logits, dmemory, dcandidate, dbias, dgate,
        *dout.stride(), *memory.stride(), *candidate.stride(), *bias.stride(), *g_strides,
        *dcandidate.stride(), *dbias.stride(), B, S, D, chunk, eps,
        HAS_GATE=has_gate, **cfg, ACC_DTYPE=acc_dtype(memory.dtype),
    )  # fmt: skip
    # The partials are summed in split order: deterministic, unlike atomics.
    dbias = dbias[0] if splits == 1 else dbias.sum(0).to(bias.dtype)
    return dmemory, dcandidate, dbias, dgate
