"""Helpers shared by the kernel launchers: interpreter detection, dtypes, tile padding, splits.

Block sizes are chosen by small deterministic heuristics (one configuration per kernel, dtype and
padded head dimension) rather than by ``triton.autotune``: every shipped configuration is then
known ahead of time and compiled for sm_90 and sm_80 in CI (``tests/test_aot_compile.py``), the
first call of a new shape pays no tuning, and the interpreter (where multi-config autotuning fails
with "0 active drivers") runs the same code path with its own small tiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from memformer_fast.backends import MAX_HEAD_DIM, interpreter_enabled

# What a launcher applies to each kernel before ``kernel[grid](...)``: the identity
# (``launch_directly``) for a plain launch, ``torch.library.wrap_triton`` inside a ``triton_op`` so
# that tracing (``torch.compile``, ``make_fx``) records the launch as a graph node (see
# :mod:`memformer_fast.ops`).
KernelWrapper = Callable[[Any], Any]


def launch_directly(kernel: Any) -> Any:
    """The kernel itself: a launcher called outside a traced op launches it as it is."""
    return kernel


def launch_traceable(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)``, what the body of a ``torch.library.triton_op``
    launches: traced (``torch.compile``, ``make_fx``), the launch becomes a graph node; run eagerly,
    ``triton_op`` switches wrapping off and this is the kernel itself. Interpreted kernels
    (``TRITON_INTERPRET=1``: nothing to compile or trace) launch directly."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


# tl.dot needs M, N, K >= 16 on NVIDIA GPUs (the interpreter accepts less, the compiler does not).
MIN_DOT_TILE = 16


def dot_tile(n: int) -> int:
    """Tile length covering ``n`` (a power of two, at least the ``tl.dot`` minimum)."""
    return max(MIN_DOT_TILE, triton.next_power_of_2(n))


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`memformer_fast.backends.accumulation_dtype` as a Triton dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# ``tl.dot`` input precision, "ieee" everywhere: float32 inputs must not silently drop to tf32 (the
# float32 kernels promise 1e-4 relative error) and "tf32x3" spills registers even on small tiles;
# float16/bfloat16 inputs, the ones that matter for speed, use tensor cores whatever this says.
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def softmax_bwd_kv_tile(
    b_k, b_v, b_qT, b_do, b_lse, b_delta, m_p, scale, b_dk, b_dv, ACC_DTYPE: tl.constexpr
):
    """One tile of an attention backward's dk/dv loop, keys as rows (shared by the memory read,
    whose keys are slots, and the memory write, whose keys are tokens).

    b_k, b_v: [BLOCK_K, BLOCK_D]; b_qT: [BLOCK_D, BLOCK_Q] (queries transposed); b_do:
    [BLOCK_Q, BLOCK_D]; b_lse, b_delta: [BLOCK_Q]; m_p: which of the [BLOCK_K, BLOCK_Q] entries
    are real. Returns ``(b_dk + dS^T q, b_dv + P^T do)``: dk is still to be multiplied by scale.
    P and dS are rounded to the input dtype before their matmuls, as flash-attention does.
    """
    b_sT = tl.dot(b_k, b_qT, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
    b_pT = tl.where(m_p, tl.exp(b_sT - b_lse[None, :]), 0.0)
    b_dv = tl.dot(
        b_pT.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE
    )
    b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    b_dsT = b_pT * (b_dpT - b_delta[None, :])
    b_dk = tl.dot(
        b_dsT.to(b_qT.dtype),
        tl.trans(b_qT),
        b_dk,
        input_precision=DOT_PRECISION,
        out_dtype=ACC_DTYPE,
    )
    return b_dk, b_dv


@triton.jit
def softmax_bwd_dq_tile(b_p, b_dp, b_delta, b_kT, b_dq, ACC_DTYPE: tl.constexpr):
    """One tile of an attention backward's dq loop, queries as rows (read and write alike).

    b_p, b_dp: [BLOCK_Q, BLOCK_K] (probabilities and dO V^T); b_delta: [BLOCK_Q]; b_kT:
    [BLOCK_D, BLOCK_K] (keys transposed). Returns ``b_dq + dS k`` with ``dS = P * (dP - delta)``
    rounded to the input dtype before the matmul; dq is still to be multiplied by scale.
    """
    b_ds = b_p * (b_dp - b_delta[:, None])
    return tl.dot(
        b_ds.to(b_kT.dtype),
        tl.trans(b_kT),
        b_dq,
        input_precision=DOT_PRECISION,
        out_dtype=ACC_DTYPE,
    )


def head_dim_tile(op: str, Dh: int) -> int:
    """``BLOCK_D`` of an attention kernel of ``op``; a ValueError beyond ``MAX_HEAD_DIM``."""
    Dh = int(Dh)  # traced with dynamic shapes: the tiles specialise the graph on the head dim
    if Dh > MAX_HEAD_DIM:
        raise ValueError(f"{op} kernels support head_dim <= {MAX_HEAD_DIM}, got {Dh}")
    return dot_tile(Dh)


AttentionConfigs = dict[tuple[str, int], dict[int, tuple[int, int, int]]]


def target_capability() -> int:
    """Compute capability (90 for sm_90) of the target Triton compiles the next launch for: the
    current device, as the JIT itself derives it (a stand-in driver names it in the AOT test)."""
    return triton.runtime.driver.active.get_current_target().arch


def attention_tiles(
    configs: AttentionConfigs,
    sm80_configs: AttentionConfigs,
    kernel: str,
    dtype: torch.dtype,
    BLOCK_D: int,
) -> dict[str, int]:
    """Tiles and launch options of an attention ``kernel`` from its table ``configs``:
    (kernel, bits per element) -> {BLOCK_D: (BLOCK_L, BLOCK_S, num_warps)}, num_stages 2.

    ``sm80_configs`` holds the entries that differ below compute capability 9.0 (sm_80's register
    allocation spills some of sm_90's tiles). bfloat16 shares float16's entry; the interpreter
    takes small tiles so tiny test shapes cross tile borders.
    """
    if interpreter_enabled():
        return {"BLOCK_L": 16, "BLOCK_S": 16, "BLOCK_D": BLOCK_D}
    key = (kernel, 8 * min(dtype.itemsize, 4))
    tiles = configs[key]
    if target_capability() < 90:
        tiles = tiles | sm80_configs.get(key, {})
    BLOCK_L, BLOCK_S, num_warps = tiles[BLOCK_D]
    return {
        "BLOCK_L": BLOCK_L,
        "BLOCK_S": BLOCK_S,
        "BLOCK_D": BLOCK_D,
        "num_warps": num_warps,
        "num_stages": 2,
    }


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for the CPU interpreter: no extra splits)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_reduction(
    length: int, block: int, programs: int, device: torch.device, num_splits: int | None = None
) -> tuple[int, int]:
    """Split a loop over ``length`` items across programs when the grid alone is too small.

    ``programs`` is the grid size without splitting. Returns ``(num_splits, chunk)``: each split
    covers ``chunk`` items (a multiple of ``block``); the partial results are reduced afterwards in
    a fixed order, so the result is deterministic. ``num_splits`` forces a count (tests).
    """
    if num_splits is None:
        # About two waves of programs, but never chunks shorter than 4 tiles.
        target = 2 * num_sms(device)
        num_splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(length, 4 * block)))
    chunk = triton.cdiv(triton.cdiv(length, max(1, num_splits)), block) * block
    chunk = max(chunk, block)
    return max(1, triton.cdiv(length, chunk)), chunk
