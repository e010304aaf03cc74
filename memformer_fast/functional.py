"""Public functional API of the three fused operations (docs/design.md, "The three operations").

Each public function validates its arguments once (a bad argument raises a ``TypeError`` or
``ValueError`` naming it, what was expected and what was given), then calls its unchecked twin
(``_memory_read_attention`` ...), which picks a backend and calls it. The layers, which validate
their own inputs and build these tensors themselves, call the twins directly:

- ``"reference"``: :mod:`memformer_fast.reference`, pure PyTorch, any device and dtype;
- ``"triton"``: the fused kernels through the custom ops of :mod:`memformer_fast.ops`, on CUDA
  tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set;
- ``"auto"``: Triton for CUDA tensors, the reference elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from . import reference
from .backends import REFERENCE_DTYPES, resolve_backend, select_backend

# The lower bound of the slot norm in the gated update, by default.
BMN_EPS = 1e-6

__all__ = [
    "gated_memory_update",
    "memory_read_attention",
    "memory_write_attention",
    "resolve_backend",
]


def _implementation(backend: str, t: Tensor, size_name: str, size: int) -> ModuleType:
    """The module whose functions of the public names run ``backend`` for ``t``
    (:func:`~memformer_fast.backends.select_backend`): :mod:`memformer_fast.reference`, or
    :mod:`memformer_fast.ops`, imported by the first ``backend="triton"`` call (defining its
    ``triton_op``\\ s imports ``torch._inductor``, a second or more, which the reference never
    needs)."""
    if select_backend(backend, t, size_name, size) == "reference":
        return reference
    from . import ops

    return ops


def _check_tensors(names: Sequence[str], tensors: Sequence[object]) -> None:
    """Every argument is a floating tensor of one dtype, on one device (which dtypes a backend
    takes is :func:`~memformer_fast.backends.select_backend`'s to say)."""
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = names[0], tensors[0]
    assert isinstance(first, Tensor)
    if first.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{first_name} must have a dtype in {[str(d) for d in REFERENCE_DTYPES]}, "
            f"got {first.dtype}"
        )
    for name, t in zip(names[1:], tensors[1:]):
        assert isinstance(t, Tensor)
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name} must be on the device of {first_name} ({first.device}), got {t.device}"
            )


def _check_shape(name: str, t: Tensor, expected: Sequence[int | None], meaning: str) -> None:
    """``t.shape`` matches ``expected`` (``None`` = any size) or a ValueError names ``name``."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want} ({meaning}), got {list(t.shape)}")


def _check_nonempty(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """No dimension is empty: a softmax over zero slots or a norm over zero features is undefined,
    and an empty launch grid is not worth a kernel path of its own."""
    for name, t in zip(names, tensors):
        if 0 in t.shape:
            raise ValueError(
                f"{name} must have no empty dimension (every size >= 1), got shape {list(t.shape)}"
            )


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_scale(scale: object) -> float | None:
    return None if scale is None else _check_positive("scale", scale)


def memory_read_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Tokens attend over all memory slots: ``softmax(scale * q k^T) v`` per head, no mask.

    Args:
        q: ``[B, L, H, Dh]`` token queries.
        k, v: ``[B, S, H, Dh]`` slot keys and values.
        scale: logit scale, ``Dh ** -0.5`` by default.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``[B, L, H, Dh]`` in the dtype of ``q``.
    """
    _check_tensors(("q", "k", "v"), (q, k, v))
    _check_shape("q", q, (None, None, None, None), "[B, L, H, Dh]")
    B, _, H, Dh = q.shape
    _check_shape("k", k, (B, None, H, Dh), "[B, S, H, Dh] matching q")
    _check_shape("v", v, tuple(k.shape), "the shape of k")
    _check_nonempty(("q", "k"), (q, k))
    return _memory_read_attention(q, k, v, _check_scale(scale), backend)


def _memory_read_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, backend: str
) -> Tensor:
    """:func:`memory_read_attention` for arguments already validated (shapes as documented
    there); chooses the backend."""
    Dh = q.shape[-1]
    impl = _implementation(backend, q, "head_dim", Dh)
    return impl.memory_read_attention(q, k, v, Dh**-0.5 if scale is None else scale)


def memory_write_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    token_mask: Tensor | None = None,
    temperature: float = 1.0,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Each memory slot attends over itself and the segment's tokens (never over other slots).

    Args:
        q, k_self, v_self: ``[B, S, H, Dh]`` per-slot query, key and value (the "self" entry).
        k, v: ``[B, L, H, Dh]`` token keys and values.
        token_mask: ``[B, L]`` bool, True for a real token; padded tokens are never written.
        temperature: divides the logits (> 0); below 1 sharpens the write.
        scale: logit scale, ``Dh ** -0.5`` by default.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``[B, S, H, Dh]``; a slot that sees no real token gets ``v_self`` exactly.
    """
    _check_tensors(("q", "k_self", "v_self", "k", "v"), (q, k_self, v_self, k, v))
    _check_shape("q", q, (None, None, None, None), "[B, S, H, Dh]")
    B, S, H, Dh = q.shape
    _check_shape("k_self", k_self, (B, S, H, Dh), "the shape of q")
    _check_shape("v_self", v_self, (B, S, H, Dh), "the shape of q")
    _check_shape("k", k, (B, None, H, Dh), "[B, L, H, Dh] matching q")
    _check_shape("v", v, tuple(k.shape), "the shape of k")
    _check_nonempty(("q", "k"), (q, k))
    if token_mask is not None:
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
            got = token_mask.dtype if isinstance(token_mask, Tensor) else type(token_mask).__name__
            raise TypeError(f"token_mask must be a bool tensor (True = real token), got {got}")
        _check_shape("token_mask", token_mask, (B, k.shape[1]), "[B, L]")
        if token_mask.device != q.device:
            raise ValueError(f"token_mask must be on {q.device}, got {token_mask.device}")
    temperature = _check_positive("temperature", temperature)
    return _memory_write_attention(
        q, k_self, v_self, k, v, token_mask, temperature, _check_scale(scale), backend
    )


def _memory_write_attention(
    q: Tensor,
    k_self: Tensor,
    v_self: Tensor,
    k: Tensor,
    v: Tensor,
    token_mask: Tensor | None,
    temperature: float,
    scale: float | None,
    backend: str,
) -> Tensor:
    """:func:`memory_write_attention` for arguments already validated (shapes as documented
    there); chooses the backend."""
    Dh = q.shape[-1]
    impl = _implementation(backend, q, "head_dim", Dh)
    scale = Dh**-0.5 if scale is None else scale
    return impl.memory_write_attention(q, k_self, v_self, k, v, token_mask, temperature, scale)


def gated_memory_update(
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None = None,
    *,
    eps: float = BMN_EPS,
    backend: str = "auto",
) -> Tensor:
    """Gated memory update with biased memory normalisation (BMN).

    ``g = sigmoid(gate_logits)`` (1 when None), ``u = g * candidate + (1 - g) * memory + bias``,
    ``new = u / max(||u||_2, eps)`` over the last axis.

    Args:
        memory, candidate: ``[B, S, D]`` current slots and the written candidate.
        bias: ``[S, D]`` learned memory bias.
        gate_logits: ``[B, S, D]`` or None for the paper's pure BMN.
        eps: lower bound of the norm (> 0).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``[B, S, D]`` unit-norm slots in the dtype of ``memory``.
    """
    names = ["memory", "candidate", "bias"]
    tensors: list[object] = [memory, candidate, bias]
    if gate_logits is not None:
        names.append("gate_logits")
        tensors.append(gate_logits)
    _check_tensors(names, tensors)
    _check_shape("memory", memory, (None, None, None), "[B, S, D]")
    B, S, D = memory.shape
    _check_shape("candidate", candidate, (B, S, D), "the shape of memory")
    _check_shape("bias", bias, (S, D), "[S, D] matching memory")
    if gate_logits is not None:
        _check_shape("gate_logits", gate_logits, (B, S, D), "the shape of memory")
    _check_nonempty(("memory",), (memory,))
    eps = _check_positive("eps", eps)
    return _gated_memory_update(memory, candidate, bias, gate_logits, eps, backend)


def _gated_memory_update(
    memory: Tensor,
    candidate: Tensor,
    bias: Tensor,
    gate_logits: Tensor | None,
    eps: float,
    backend: str,
) -> Tensor:
    """:func:`gated_memory_update` for arguments already validated (shapes as documented there);
    chooses the backend."""
    impl = _implementation(backend, memory, "D", memory.shape[-1])
    return impl.gated_memory_update(memory, candidate, bias, gate_logits, eps)
