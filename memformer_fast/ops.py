"""The ops of the three fused operations: autograd, fake tensors and ``torch.compile``.

Design
------
Each operation is a pair of ops in the ``memformer_fast`` namespace: a forward that also returns
what its backward needs (the log-sum-exp of the attention rows) and a backward, tied together with
``register_autograd``. Both are ``torch.library.triton_op``\\ s (torch >= 2.6), whose body is plain
Python that ``torch.compile`` traces through:

- On CUDA tensors the body runs the Triton launchers of :mod:`memformer_fast.kernels` with
  ``wrap=launch_traceable`` (``torch.library.wrap_triton``). Eagerly that is a plain launch; traced,
  every launch becomes a ``triton_kernel_wrapper_functional`` node naming its kernel, beside the
  allocations and the few reductions of the launcher, so inductor calls the kernels from its
  generated code (no Python launcher per call) and CUDA graphs (``mode="reduce-overhead"``)
  capture them. The same body, run on fake tensors, is the op's fake implementation.
- On every other device the body calls an opaque ``torch.library.custom_op`` (``*_portable``):
  the same Triton launchers when the tensors are on the CPU and ``TRITON_INTERPRET=1`` is set,
  which is how CI runs the whole op path (op, autograd, kernels) without a GPU (interpreted kernels
  cannot be traced, so they stay behind an opaque op); otherwise PyTorch,
  :mod:`memformer_fast.reference` for the forward and the explicit backward formulas below, so the
  ops run, compile and pass ``opcheck`` anywhere.

With torch < 2.6 (no ``triton_op``) the same bodies are ``custom_op``\\ s with the fakes below:
opaque to ``torch.compile``, as the kernels were before.

Because the backward is an op too, ``torch.compile(fullgraph=True)`` needs no graph break for
either direction. The functions at the bottom are what :mod:`memformer_fast.functional` calls for
``backend="triton"``; their arguments are already validated there.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import reference
from .backends import accumulation_dtype, interpreter_enabled, triton_available
from .reference import no_autocast

# Schema of each op (and of its portable op); a triton_op infers the same from its annotations.
_SCHEMAS = {
    "memory_read_fwd": "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    "memory_read_bwd": "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor lse, float scale) "
    "-> (Tensor, Tensor, Tensor)",
    "memory_write_fwd": "(Tensor q, Tensor k_self, Tensor v_self, Tensor k, Tensor v, "
    "Tensor? token_mask, float temperature, float scale) -> (Tensor, Tensor)",
    "memory_write_bwd": "(Tensor do, Tensor q, Tensor k_self, Tensor v_self, Tensor k, Tensor v, "
    "Tensor? token_mask, Tensor o, Tensor lse, float temperature, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "gated_memory_update_fwd": "(Tensor memory, Tensor candidate, Tensor bias, "
    "Tensor? gate_logits, float eps) -> Tensor",
    "gated_memory_update_bwd": "(Tensor dout, Tensor memory, Tensor candidate, Tensor bias, "
    "Tensor? gate_logits, float eps) -> Tensor[]",
}
# Launcher of each op (memformer_fast.kernels).
_LAUNCHERS = {
    "memory_read_fwd": "memory_read_fwd",
    "memory_read_bwd": "memory_read_bwd",
    "memory_write_fwd": "memory_write_fwd",
    "memory_write_bwd": "memory_write_bwd",
    "gated_memory_update_fwd": "gated_update_fwd",
    "gated_memory_update_bwd": "gated_update_bwd",
}


@functools.cache
def _kernels() -> ModuleType:
    """The kernels, imported on first use: importing them imports Triton, which is slow and
    optional off CUDA, and decides (from ``TRITON_INTERPRET``) whether they are interpreted."""
    kernels = importlib.import_module("memformer_fast.kernels")  # installed from kernels/
    _name_kernels_for_compile_caches(kernels)
    return kernels


def _name_kernels_for_compile_caches(kernels: ModuleType) -> None:
    """Tell torch which Triton kernels each op launches, for the compile caches.

    ``triton_op`` finds the kernels of an op by reading its body's source, which launches them
    through the launchers of a module imported only now, so it finds none; the compile caches,
    whose keys hash the kernels' sources, then miss an edit of a kernel. The registry written
    here, ``torch._library.triton.triton_ops_to_kernels``, is private to torch (a dict from the
    op's qualified name to its kernels, checked against torch 2.13): where it moved or changed
    type, nothing is written and only that cache key loses the kernels' sources.
    """
    registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(registry, dict):
        for op, launcher in _LAUNCHERS.items():
            registry[f"memformer_fast::{op}"] = list(kernels.LAUNCHED_KERNELS[launcher])


def _on_cuda(t: Tensor) -> bool:
    """Whether an op body launches the kernels itself (traceably), rather than calling its
    portable op."""
    return t.device.type == "cuda"


def _interpreted(t: Tensor) -> bool:
    """Whether a portable op runs the kernels: on CPU tensors through the interpreter."""
    return t.device.type == "cpu" and interpreter_enabled() and triton_available()


def _kernel_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the op ``memformer_fast::<name>`` with the decorated body, a ``triton_op``
    (its fake implementation is the body itself) or, before torch 2.6, a ``custom_op`` with
    ``fake`` (which must give the shapes the body gives)."""
    qualname = f"memformer_fast::{name}"

    def define(body: Callable[..., Any]) -> Any:
        triton_op = getattr(torch.library, "triton_op", None)
        if triton_op is not None:
            return triton_op(qualname, mutates_args=())(body)
        op = torch.library.custom_op(qualname, mutates_args=(), schema=_SCHEMAS[name])(body)
        op.register_fake(fake)
        return op

    return define


def _portable_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: the opaque ``custom_op`` ``memformer_fast::<name>_portable`` with the decorated
    body (the interpreter or PyTorch) and ``fake``, which the op ``name`` calls off CUDA."""

    def define(body: Callable[..., Any]) -> Any:
        qualname = f"memformer_fast::{name}_portable"
        op = torch.library.custom_op(qualname, mutates_args=(), schema=_SCHEMAS[name])(body)
        op.register_fake(fake)
        return op

    return define


def _like(grad: Tensor, t: Tensor) -> Tensor:
    """A gradient in the dtype of its input, contiguous (what the kernels return)."""
    return grad.to(t.dtype).contiguous()


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# Memory read
# --------------------------------------------------------------------------------------------


@no_autocast
def _read_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """[B, H, L, S] scaled logits in the accumulation dtype."""
    ct = accumulation_dtype(q.dtype)
    return torch.einsum("blhd,bshd->bhls", q.to(ct), k.to(ct)) * scale


def _read_fwd_fake(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    B, L, H, _ = q.shape
    return _empty_like(q), q.new_empty((B, H, L), dtype=accumulation_dtype(q.dtype))


@_portable_op("memory_read_fwd", _read_fwd_fake)
def _memory_read_fwd_portable(
    q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    if _interpreted(q):
        return _kernels().memory_read_fwd(q, k, v, scale)
    o = reference.memory_read_attention(q, k, v, scale).contiguous()
    return o, torch.logsumexp(_read_logits(q, k, scale), dim=-1)


@_kernel_op("memory_read_fwd", _read_fwd_fake)
def memory_read_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q: [B, L, H, Dh]; k, v: [B, S, H, Dh] -> (o [B, L, H, Dh], lse [B, H, L] float32)."""
    if _on_cuda(q):
        kernels = _kernels()
        return kernels.memory_read_fwd(q, k, v, scale, wrap=kernels.launch_traceable)
    return _memory_read_fwd_portable(q, k, v, scale)


@no_autocast
def _read_bwd_reference(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    ct = accumulation_dtype(q.dtype)
    p = torch.exp(_read_logits(q, k, scale) - lse[..., None])  # [B, H, L, S]
    do_, q_, k_, v_ = do.to(ct), q.to(ct), k.to(ct), v.to(ct)
    dp = torch.einsum("blhd,bshd->bhls", do_, v_)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.einsum("bhls,bshd->blhd", ds, k_) * scale
    dk = torch.einsum("bhls,blhd->bshd", ds, q_) * scale
    dv = torch.einsum("bhls,blhd->bshd", p, do_)
    return _like(dq, q), _like(dk, k), _like(dv, v)


def _read_bwd_fake(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _empty_like(q), _empty_like(k), _empty_like(v)


@_portable_op("memory_read_bwd", _read_bwd_fake)
def _memory_read_bwd_portable(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _interpreted(q):
        return _kernels().memory_read_bwd(do, q, k, v, lse, scale)
    return _read_bwd_reference(do, q, k, v, lse, scale)


@_kernel_op("memory_read_bwd", _read_bwd_fake)
def memory_read_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`memory_read_fwd` for the upstream gradient ``do``."""
    if _on_cuda(q):
        kernels = _kernels()
        return kernels.memory_read_bwd(do, q, k, v, lse, scale, wrap=kernels.launch_traceable)
    return _memory_read_bwd_portable(do, q, k, v, lse, scale)


def _read_setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _read_backward(ctx, do: Tensor, _dlse: Tensor):
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = memory_read_bwd(do, q, k, v, lse, ctx.scale)
    return dq, dk, dv, None


memory_read_fwd.register_autograd(_read_backward, setup_context=_read_setup_context)


def _refuse_double_backward(ctx, *grads: Tensor) -> None:
    """The backward ops have no derivative of their own: say so instead of torch's generic
    "no autograd formula was registered" (the reference backend is plain autograd and has one)."""
    raise RuntimeError(
        "memformer_fast: double backward (a gradient of a gradient, e.g. create_graph=True then "
        "backward again) is not supported by backend='triton'; use backend='reference' for it"
    )


memory_read_bwd.register_autograd(_refuse_double_backward)


# --------------------------------------------------------------------------------------------
# Memory write
# --------------------------------------------------------------------------------------------


@no_autocast
def _write_logits(
    q: Tensor, k_self: Tensor, k: Tensor, token_mask: Tensor | None, logit_scale: float
) -> tuple[Tensor, Tensor]:
    """Self logits [B, S, H] and token logits [B, S, H, L] (-inf at padding), accumulation dtype."""
    ct = accumulation_dtype(q.dtype)
    q_ = q.to(ct)
    s_self = (q_ * k_self.to(ct)).sum(-1) * logit_scale
    s_tok = torch.einsum("bshd,blhd->bshl", q_, k.to(ct)) * logit_scale
    if token_mask is not None:
        s_tok = s_tok.masked_fill(~token_mask[:, None, None, :], float("-inf"))
    return s_self, s_tok


def _write_fwd_fake(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    B, S, H, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), q.new_empty((B, H, S), dtype=acc)


@_portable_op("memory_write_fwd", _write_fwd_fake)
def _memory_write_fwd_portable(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    if _interpreted(q):
        return _kernels().memory_write_fwd(q, k_self, v_self, k, v, token_mask, temperature, scale)
    ct = accumulation_dtype(q.dtype)
    o = reference.memory_write_attention(
        q.to(ct), k_self.to(ct), v_self.to(ct), k.to(ct), v.to(ct), token_mask, temperature, scale
    ).contiguous()
    s_self, s_tok = _write_logits(q, k_self, k, token_mask, scale / temperature)
    lse = torch.logsumexp(torch.cat([s_self[..., None], s_tok], dim=-1), dim=-1)
    return o, lse.transpose(1, 2).contiguous()


@_kernel_op("memory_write_fwd", _write_fwd_fake)
def memory_write_fwd(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """q, k_self, v_self: [B, S, H, Dh]; k, v: [B, L, H, Dh]; token_mask: [B, L] or None
    -> (o [B, S, H, Dh], lse [B, H, S] over the 1 + L entries), both float32 (float64 for float64).

    The output is not rounded to the input dtype here: the backward needs the exact one (see
    :func:`memory_write_attention`, which rounds it).
    """
    args = (q, k_self, v_self, k, v, token_mask, temperature, scale)
    if _on_cuda(q):
        kernels = _kernels()
        return kernels.memory_write_fwd(*args, wrap=kernels.launch_traceable)
    return _memory_write_fwd_portable(*args)


@no_autocast
def _write_bwd_reference(
    do: Tensor,
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    lse: Tensor,
    logit_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ct = accumulation_dtype(q.dtype)
    s_self, s_tok = _write_logits(q, k_self, k, token_mask, logit_scale)
    lse = lse.transpose(1, 2)  # [B, S, H]
    p_self = torch.exp(s_self - lse)
    p_tok = torch.exp(s_tok - lse[..., None])  # exactly 0 at padding
    do_, q_, ks_, vs_, k_, v_ = (t.to(ct) for t in (do, q, k_self, v_self, k, v))
    dp_self = (do_ * vs_).sum(-1)
    dp_tok = torch.einsum("bshd,blhd->bshl", do_, v_)
    delta = p_self * dp_self + (p_tok * dp_tok).sum(-1)
    ds_self = p_self * (dp_self - delta)
    ds_tok = p_tok * (dp_tok - delta[..., None])
    dq = (ds_self[..., None] * ks_ + torch.einsum("bshl,blhd->bshd", ds_tok, k_)) * logit_scale
    dk_self = ds_self[..., None] * q_ * logit_scale
    dv_self = p_self[..., None] * do_
    dk = torch.einsum("bshl,bshd->blhd", ds_tok, q_) * logit_scale
    dv = torch.einsum("bshl,bshd->blhd", p_tok, do_)
    return (
        _like(dq, q),
        _like(dk_self, k_self),
        _like(dv_self, v_self),
        _like(dk, k),
        _like(dv, v),
    )


def _write_bwd_fake(
    do: Tensor,
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    o: Tensor,
    lse: Tensor,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (
        _empty_like(q),
        _empty_like(k_self),
        _empty_like(v_self),
        _empty_like(k),
        _empty_like(v),
    )


@_portable_op("memory_write_bwd", _write_bwd_fake)
def _memory_write_bwd_portable(
    do: Tensor,
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    o: Tensor,
    lse: Tensor,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _interpreted(q):
        return _kernels().memory_write_bwd(
            do, q, k_self, v_self, k, v, token_mask, o, lse, temperature, scale
        )
    return _write_bwd_reference(do, q, k_self, v_self, k, v, token_mask, lse, scale / temperature)


@_kernel_op("memory_write_bwd", _write_bwd_fake)
def memory_write_bwd(
    do: Tensor,
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    o: Tensor,
    lse: Tensor,
    temperature: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk_self, dv_self, dk, dv) of :func:`memory_write_fwd` for ``do``."""
    args = (do, q, k_self, v_self, k, v, token_mask, o, lse, temperature, scale)
    if _on_cuda(q):
        kernels = _kernels()
        return kernels.memory_write_bwd(*args, wrap=kernels.launch_traceable)
    return _memory_write_bwd_portable(*args)


def _write_setup_context(ctx, inputs, output) -> None:
    q, k_self, v_self, k, v, token_mask, temperature, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k_self, v_self, k, v, token_mask, o, lse)
    ctx.temperature, ctx.scale = temperature, scale
    ctx.mark_non_differentiable(lse)


def _write_backward(ctx, do: Tensor, _dlse: Tensor):
    q, k_self, v_self, k, v, token_mask, o, lse = ctx.saved_tensors
    grads = memory_write_bwd(
        do, q, k_self, v_self, k, v, token_mask, o, lse, ctx.temperature, ctx.scale
    )
    return (*grads, None, None, None)


memory_write_fwd.register_autograd(_write_backward, setup_context=_write_setup_context)
memory_write_bwd.register_autograd(_refuse_double_backward)


# --------------------------------------------------------------------------------------------
# Gated memory update (BMN)
# --------------------------------------------------------------------------------------------


def _gated_fwd_fake(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    return _empty_like(memory)


@_portable_op("gated_memory_update_fwd", _gated_fwd_fake)
def _gated_memory_update_fwd_portable(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    if _interpreted(memory):
        return _kernels().gated_update_fwd(memory, candidate, bias, gate_logits, eps)
    return reference.gated_memory_update(memory, candidate, bias, gate_logits, eps).contiguous()


@_kernel_op("gated_memory_update_fwd", _gated_fwd_fake)
def gated_memory_update_fwd(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    """memory, candidate: [B, S, D]; bias: [S, D]; gate_logits: [B, S, D] or None -> [B, S, D]."""
    if _on_cuda(memory):
        kernels = _kernels()
        return kernels.gated_update_fwd(
            memory, candidate, bias, gate_logits, eps, wrap=kernels.launch_traceable
        )
    return _gated_memory_update_fwd_portable(memory, candidate, bias, gate_logits, eps)


@no_autocast
def _gated_bwd_reference(
    dout: Tensor,
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
) -> list[Tensor]:
    ct = accumulation_dtype(memory.dtype)
    m, c, b, do = memory.to(ct), candidate.to(ct), bias.to(ct), dout.to(ct)
    g = None if gate_logits is None else torch.sigmoid(gate_logits.to(ct))
    u = c + b if g is None else g * c + (1 - g) * m + b
    norm = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    # Below eps the norm is the constant eps: clamp_min passes no gradient there.
    n = norm.clamp_min(eps)
    y = u / n
    du = (do - y * torch.where(norm < eps, 0.0, (do * y).sum(-1, keepdim=True))) / n
    if g is None:
        return [d.to(memory.dtype).contiguous() for d in (du, du.sum(0))]
    grads = ((1 - g) * du, g * du, du.sum(0), du * (c - m) * g * (1 - g))
    return [d.to(memory.dtype).contiguous() for d in grads]


def _gated_bwd_triton(
    dout: Tensor,
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
    wrap: Callable[[Any], Any] | None = None,
) -> list[Tensor]:
    """The kernel's gradients without the ``None``\\ s of an absent gate; ``wrap`` as for the
    launcher (a direct launch when None)."""
    kernels = _kernels()
    grads = kernels.gated_update_bwd(
        dout, memory, candidate, bias, gate_logits, eps, wrap=wrap or kernels.launch_directly
    )
    return [g for g in grads if g is not None]


def _gated_bwd_fake(
    dout: Tensor,
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
) -> list[Tensor]:
    like = (candidate, bias) if gate_logits is None else (memory, candidate, bias, gate_logits)
    return [_empty_like(t) for t in like]


@_portable_op("gated_memory_update_bwd", _gated_bwd_fake)
def _gated_memory_update_bwd_portable(
    dout: Tensor,
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
) -> list[Tensor]:
    if _interpreted(memory):
        return _gated_bwd_triton(dout, memory, candidate, bias, gate_logits, eps)
    return _gated_bwd_reference(dout, memory, candidate, bias, gate_logits, eps)


@_kernel_op("gated_memory_update_bwd", _gated_bwd_fake)
def gated_memory_update_bwd(
    dout: Tensor,
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
) -> list[Tensor]:
    """Gradients of :func:`gated_memory_update_fwd`: ``[d_memory, d_candidate, d_bias,
    d_gate_logits]``, or ``[d_candidate, d_bias]`` without a gate (the memory is then unused)."""
    args = (dout, memory, candidate, bias, gate_logits, eps)
    if _on_cuda(memory):
        return _gated_bwd_triton(*args, wrap=_kernels().launch_traceable)
    return _gated_memory_update_bwd_portable(*args)


def _gated_setup_context(ctx, inputs, output) -> None:
    memory, candidate, bias, gate_logits, eps = inputs
    ctx.save_for_backward(memory, candidate, bias, gate_logits)
    ctx.eps = eps


def _gated_backward(ctx, dout: Tensor):
    memory, candidate, bias, gate_logits = ctx.saved_tensors
    grads = gated_memory_update_bwd(dout, memory, candidate, bias, gate_logits, ctx.eps)
    if gate_logits is None:
        d_candidate, d_bias = grads
        return None, d_candidate, d_bias, None, None
    d_memory, d_candidate, d_bias, d_gate = grads
    return d_memory, d_candidate, d_bias, d_gate, None


gated_memory_update_fwd.register_autograd(_gated_backward, setup_context=_gated_setup_context)
gated_memory_update_bwd.register_autograd(_refuse_double_backward)


# --------------------------------------------------------------------------------------------
# What memformer_fast.functional calls for backend="triton" (arguments already validated)
# --------------------------------------------------------------------------------------------


def memory_read_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Fused memory read (design.md, "Memory read"): q [B, L, H, Dh], k, v [B, S, H, Dh]
    -> [B, L, H, Dh]."""
    return memory_read_fwd(q, k, v, scale)[0]


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
    """Fused memory write (design.md, "Memory write"): q, k_self, v_self [B, S, H, Dh],
    k, v [B, L, H, Dh], token_mask [B, L] bool or None -> [B, S, H, Dh].

    The op's float32 output is rounded here, outside it, so that its backward sees the unrounded
    output (a no-op for float32 inputs).
    """
    o, _ = memory_write_fwd(q, k_self, v_self, k, v, token_mask, temperature, scale)
    return o.to(q.dtype)


def gated_memory_update(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    """Fused gated BMN update (design.md, "Gated update"): memory, candidate [B, S, D], bias [S, D],
    gate_logits [B, S, D] or None -> [B, S, D]."""
    return gated_memory_update_fwd(memory, candidate, bias, gate_logits, eps)
