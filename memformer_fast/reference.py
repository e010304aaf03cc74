"""The three Memformer operations in plain PyTorch: the one statement of their math outside the
Triton kernels (docs/design.md, "The three operations").

The kernels are tested against these, and the ops' portable backward is autograd of these (see
:mod:`memformer_fast.ops`). They take ``[batch, length, heads, head_dim]`` tensors, accumulate in
float32 (float64 stays float64) and return the dtype of their inputs. No argument checking happens
here: see ``functional``.

Each attention has two faces over one body: the public one returns the output; the op's forward
(``memory_read``, ``memory_write``) also returns the log-sum-exp of each softmax row, which the
kernels' backward needs, and its annotations are the op's signature.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from .backends import accumulation_dtype

F = TypeVar("F", bound=Callable[..., object])


def no_autocast(fn: F) -> F:
    """Run ``fn`` with autocast off, so its matmuls really accumulate in float32 (or float64)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@no_autocast
def _read(q: Tensor, k: Tensor, v: Tensor, scale: float, lse: bool) -> tuple[Tensor, Tensor | None]:
    ct = accumulation_dtype(q.dtype)
    logits = torch.einsum("blhd,bshd->bhls", q.to(ct), k.to(ct)) * scale  # [B, H, L, S]
    probs = torch.softmax(logits, dim=-1)
    o = torch.einsum("bhls,bshd->blhd", probs, v.to(ct)).to(q.dtype)
    return o, torch.logsumexp(logits, dim=-1) if lse else None


def memory_read_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Tokens attend over every memory slot (no mask).

    q: [B, L, H, Dh]; k, v: [B, S, H, Dh] -> o: [B, L, H, Dh]
    """
    return _read(q, k, v, scale, lse=False)[0]


def memory_read(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The op's forward: (o [B, L, H, Dh] in q's dtype, lse [B, H, L] in the accumulation dtype)."""
    o, lse = _read(q, k, v, scale, lse=True)
    assert lse is not None
    return o, lse


@no_autocast
def _write(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
    lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """(o [B, S, H, Dh], lse [B, H, S] or None), both in the accumulation dtype."""
    ct = accumulation_dtype(q.dtype)
    q, k_self, v_self, k, v = (t.to(ct) for t in (q, k_self, v_self, k, v))
    logit_scale = scale / temperature
    logits_self = (q * k_self).sum(-1, keepdim=True) * logit_scale  # [B, S, H, 1]
    logits_tok = torch.einsum("bshd,blhd->bshl", q, k) * logit_scale  # [B, S, H, L]
    if token_mask is not None:
        logits_tok = logits_tok.masked_fill(~token_mask[:, None, None, :], float("-inf"))
        v = v.masked_fill(~token_mask[:, :, None, None], 0.0)  # a padded value never leaks (NaN)
    # The self logit is always finite, so the softmax never sees a row of -inf only.
    logits = torch.cat([logits_self, logits_tok], dim=-1)
    probs = torch.softmax(logits, dim=-1)
    o = probs[..., :1] * v_self + torch.einsum("bshl,blhd->bshd", probs[..., 1:], v)
    return o, torch.logsumexp(logits, dim=-1).transpose(1, 2) if lse else None


def memory_write_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
) -> Tensor:
    """Each slot attends over itself and the segment's tokens, never over other slots.

    q, k_self, v_self: [B, S, H, Dh]; k, v: [B, L, H, Dh]; token_mask: [B, L] bool (True = real)
    -> o: [B, S, H, Dh]. A slot that sees no real token returns ``v_self`` exactly.
    """
    o, _ = _write(q, k_self, v_self, k, v, token_mask, temperature, scale, lse=False)
    return o.to(q.dtype)


def memory_write(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The op's forward: (o [B, S, H, Dh], lse [B, H, S] over the 1 + L entries), both in the
    accumulation dtype; the caller rounds o (its backward wants the unrounded one)."""
    o, lse = _write(q, k_self, v_self, k, v, token_mask, temperature, scale, lse=True)
    assert lse is not None
    return o, lse


@no_autocast
def gated_memory_update(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    """Gated update followed by biased memory normalisation (BMN).

    memory, candidate: [B, S, D]; bias: [S, D]; gate_logits: [B, S, D] or None -> [B, S, D]
    ``u = g * candidate + (1 - g) * memory + bias``, ``new = u / max(||u||_2, eps)`` over D.
    """
    ct = accumulation_dtype(memory.dtype)
    m, c, b = memory.to(ct), candidate.to(ct), bias.to(ct)
    if gate_logits is None:
        u = c + b
    else:
        g = torch.sigmoid(gate_logits.to(ct))
        u = g * c + (1 - g) * m + b
    # Below eps the norm is the constant eps: clamp_min passes no gradient there.
    norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(eps)
    return (u / norm).to(memory.dtype)
