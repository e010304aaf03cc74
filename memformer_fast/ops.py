"""The ops of the three fused operations: autograd, fake tensors and ``torch.compile``.

An op is declared once, by :func:`_define`, from three things: its reference forward in
:mod:`memformer_fast.reference` (whose annotations are the op's signature), and the Triton
launchers of its forward and backward in :mod:`memformer_fast.kernels`. Everything else is
generated from those:

- ``memformer_fast::<name>_fwd`` and ``memformer_fast::<name>_bwd``, ``torch.library.triton_op``\\ s
  whose body is plain Python that ``torch.compile`` traces through. On CUDA tensors the body runs
  the launchers with ``wrap=launch_traceable`` (``torch.library.wrap_triton``): eagerly a plain
  launch; traced, one ``triton_kernel_wrapper_functional`` node per launch, so inductor calls the
  kernels from its generated code and CUDA graphs capture them. The same body on fake tensors is
  the op's fake implementation.
- On every other device the body calls an opaque ``torch.library.custom_op``
  (``<name>_fwd_portable``, ``<name>_bwd_portable``): the same launchers when the tensors are on
  the CPU and ``TRITON_INTERPRET=1`` is set (how CI runs the whole op path without a GPU;
  interpreted kernels cannot be traced, so they stay behind an opaque op), otherwise the reference
  forward and, for the backward, autograd of that same reference: the math is written once.
- The backward's signature is the forward's with the upstream gradient of the first output in
  front and the forward's outputs behind: ``(grad, *inputs, *outputs) -> Tensor[]``, one gradient
  per floating-point tensor input given (zeros where an input does not reach the output).
  ``register_autograd`` ties the two; the backward op refuses a derivative of its own.

Because the backward is an op too, ``torch.compile(fullgraph=True)`` needs no graph break for
either direction. The functions at the bottom are what :mod:`memformer_fast.functional` calls for
``backend="triton"``; their arguments are already validated there.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import reference
from .backends import interpreter_enabled, triton_available

# A forward launcher: (kernels module, *inputs, wrap) -> outputs. A backward launcher:
# (kernels module, grad, *inputs, *outputs, wrap) -> one gradient (or None) per tensor input.
Launcher = Callable[..., Any]


@functools.cache
def _kernels() -> ModuleType:
    """The kernels, imported on first use: importing them imports Triton, which is slow and
    optional off CUDA, and decides (from ``TRITON_INTERPRET``) whether they are interpreted."""
    kernels = importlib.import_module("memformer_fast.kernels")  # installed from kernels/
    _name_kernels_for_compile_caches(kernels)
    return kernels


# Launcher (memformer_fast.kernels.LAUNCHED_KERNELS) of each op, for the compile caches.
_LAUNCHERS: dict[str, str] = {}


def _name_kernels_for_compile_caches(kernels: ModuleType) -> None:
    """Tell torch which Triton kernels each op launches, for the compile caches.

    ``triton_op`` finds the kernels of an op by reading its body's source, which launches them
    through the launchers of a module imported only now, so it finds none; the compile caches,
    whose keys hash the kernels' sources, then miss an edit of a kernel. The registry written
    here, ``torch._library.triton.triton_ops_to_kernels``, is private to torch (a dict from the
    op's qualified name to its kernels, checked against torch 2.11 and 2.13): where it moved or
    changed type, nothing is written and only that cache key loses the kernels' sources.
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


def _autograd_inside_op() -> Any:
    """A context in which autograd records again inside an op's implementation.

    A ``custom_op``'s implementation runs with the autograd dispatch keys excluded (so it is one
    node for autograd); the portable backward differentiates the reference there, so it takes
    them out of the thread's excluded set for the call. ``torch._C._ForceDispatchKeyGuard`` and
    the dispatch key sets are private to torch (checked against torch 2.11 and 2.13).
    """
    C = torch._C
    autograd = C.DispatchKeySet(C.DispatchKey.AutogradFunctionality) | C.DispatchKeySet(
        C.DispatchKey.ADInplaceOrView
    )
    excluded = C._dispatch_tls_local_exclude_set() - autograd
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), excluded)


def _contiguous(outputs: Tensor | tuple[Tensor, ...]) -> Any:
    """What the launchers return: contiguous outputs (a fake must give the strides of the real)."""
    if isinstance(outputs, Tensor):
        return outputs.contiguous()
    return tuple(t.contiguous() for t in outputs)


def _differentiable(args: Sequence[object]) -> list[Tensor]:
    """The inputs that get a gradient: the floating-point tensors given."""
    return [a for a in args if isinstance(a, Tensor) and a.is_floating_point()]


def _gradients(grads: Sequence[Tensor | None], args: Sequence[object]) -> list[Tensor]:
    """One contiguous gradient per differentiable input, from one (or None) per tensor input in
    ``grads``; an input that does not reach the output (the memory without a gate) gets zeros."""
    tensors = [a for a in args if isinstance(a, Tensor) or a is None]
    return [
        torch.zeros_like(t) if g is None else g.contiguous()
        for t, g in zip(tensors, grads)
        if isinstance(t, Tensor) and t.is_floating_point()
    ]


def _refuse_double_backward(ctx: Any, *grads: Tensor) -> None:
    """The backward ops have no derivative of their own: say so instead of torch's generic
    "no autograd formula was registered" (the reference backend is plain autograd and has one)."""
    raise RuntimeError(
        "memformer_fast: double backward (a gradient of a gradient, e.g. create_graph=True then "
        "backward again) is not supported by backend='triton'; use backend='reference' for it"
    )


_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _signed(body: Callable[..., Any], signature: inspect.Signature) -> Callable[..., Any]:
    """``body`` (which takes ``*args``) presenting ``signature``, from which torch infers the
    op's schema."""

    @functools.wraps(body)
    def signed(*args: Any) -> Any:
        return body(*args)

    signed.__signature__ = signature  # type: ignore[attr-defined]
    return signed


def _signatures(forward: Callable[..., Any]) -> tuple[inspect.Signature, inspect.Signature]:
    """The forward's signature (the reference's) and the backward's made from it:
    ``(grad, *inputs, *outputs) -> list[Tensor]``."""
    fwd_sig = inspect.signature(forward, eval_str=True)
    outputs = fwd_sig.return_annotation
    n_outputs = len(outputs.__args__) if getattr(outputs, "__origin__", None) is tuple else 1
    tensor = functools.partial(inspect.Parameter, kind=_POSITIONAL, annotation=Tensor)
    bwd_sig = inspect.Signature(
        [tensor("grad"), *fwd_sig.parameters.values()]
        + [tensor(f"out{i}") for i in range(n_outputs)],
        return_annotation=list[Tensor],
    )
    return fwd_sig, bwd_sig


def _register_autograd(fwd_op: Any, bwd_op: Any) -> None:
    """The forward's backward is ``bwd_op(grad, *inputs, *outputs)``; the backward has none."""

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        ctx.is_tensor = [isinstance(a, Tensor) for a in inputs]
        ctx.constants = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, Tensor)), *outs)
        ctx.mark_non_differentiable(*outs[1:])

    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        grads = iter(bwd_op(grad, *args, *saved))
        return tuple(
            next(grads) if isinstance(a, Tensor) and a.is_floating_point() else None for a in args
        )

    fwd_op.register_autograd(backward, setup_context=setup_context)
    bwd_op.register_autograd(_refuse_double_backward)


def _define(
    name: str,
    forward: Callable[..., Any],
    kernel_fwd: Launcher,
    kernel_bwd: Launcher,
    launcher: str,
) -> tuple[Any, Any]:
    """Register ``memformer_fast::<name>_fwd`` / ``_bwd`` (and their portable ops) from the
    reference ``forward``, whose annotations are the forward's schema; return the two ops."""
    fwd_sig, bwd_sig = _signatures(forward)
    n_inputs = len(fwd_sig.parameters)

    def reference_fwd(*args: Any) -> Any:
        return _contiguous(forward(*args))

    def portable_fwd(*args: Any) -> Any:
        if _interpreted(_differentiable(args)[0]):
            return kernel_fwd(_kernels(), *args, wrap=_kernels().launch_directly)
        return reference_fwd(*args)

    def portable_bwd(grad: Tensor, *args: Any) -> list[Tensor]:
        inputs, outs = args[:n_inputs], args[n_inputs:]
        if _interpreted(grad):
            grads = kernel_bwd(_kernels(), grad, *inputs, *outs, wrap=_kernels().launch_directly)
            return _gradients(grads, inputs)
        with torch.enable_grad(), _autograd_inside_op():
            leaves = [
                a.detach().requires_grad_()
                if isinstance(a, Tensor) and a.is_floating_point()
                else a
                for a in inputs
            ]
            out = forward(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            diff = _differentiable(leaves)
            found = torch.autograd.grad(out, diff, grad, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(diff, found)]

    def bwd_fake(grad: Tensor, *args: Any) -> list[Tensor]:
        return [torch.empty_like(t) for t in _differentiable(args[:n_inputs])]

    fwd_portable = torch.library.custom_op(
        f"memformer_fast::{name}_fwd_portable", _signed(portable_fwd, fwd_sig), mutates_args=()
    )
    fwd_portable.register_fake(reference_fwd)  # the reference on fake tensors gives the shapes
    bwd_portable = torch.library.custom_op(
        f"memformer_fast::{name}_bwd_portable", _signed(portable_bwd, bwd_sig), mutates_args=()
    )
    bwd_portable.register_fake(bwd_fake)

    def fwd_body(*args: Any) -> Any:
        if _on_cuda(_differentiable(args)[0]):
            return kernel_fwd(_kernels(), *args, wrap=_kernels().launch_traceable)
        return fwd_portable(*args)

    def bwd_body(grad: Tensor, *args: Any) -> list[Tensor]:
        if _on_cuda(grad):
            grads = kernel_bwd(_kernels(), grad, *args, wrap=_kernels().launch_traceable)
            return _gradients(grads, args[:n_inputs])
        return bwd_portable(grad, *args)

    fwd_op: Any = torch.library.triton_op(
        f"memformer_fast::{name}_fwd", _signed(fwd_body, fwd_sig), mutates_args=()
    )
    bwd_op: Any = torch.library.triton_op(
        f"memformer_fast::{name}_bwd", _signed(bwd_body, bwd_sig), mutates_args=()
    )
    _LAUNCHERS[f"{name}_fwd"], _LAUNCHERS[f"{name}_bwd"] = f"{launcher}_fwd", f"{launcher}_bwd"

    _register_autograd(fwd_op, bwd_op)
    return fwd_op, bwd_op


# --------------------------------------------------------------------------------------------
# The three ops: the reference forward, and how each kernel launcher is called.
# --------------------------------------------------------------------------------------------

memory_read_fwd, memory_read_bwd = _define(
    "memory_read",
    reference.memory_read,
    lambda K, *args, wrap: K.memory_read_fwd(*args, wrap=wrap),
    lambda K, do, q, k, v, scale, o, lse, *, wrap: K.memory_read_bwd(
        do, q, k, v, lse, scale, wrap=wrap
    ),
    launcher="memory_read",
)

memory_write_fwd, memory_write_bwd = _define(
    "memory_write",
    reference.memory_write,
    lambda K, *args, wrap: K.memory_write_fwd(*args, wrap=wrap),
    # The kernels take (..., token_mask, o, lse, temperature, scale); token_mask gets no gradient.
    lambda K, do, q, ks, vs, k, v, mask, temperature, scale, o, lse, *, wrap: (
        *K.memory_write_bwd(do, q, ks, vs, k, v, mask, o, lse, temperature, scale, wrap=wrap),
        None,
    ),
    launcher="memory_write",
)

gated_memory_update_fwd, gated_memory_update_bwd = _define(
    "gated_memory_update",
    reference.gated_memory_update,
    lambda K, *args, wrap: K.gated_update_fwd(*args, wrap=wrap),
    lambda K, dout, *args, wrap: K.gated_update_bwd(dout, *args[:-1], wrap=wrap),
    launcher="gated_update",
)


# --------------------------------------------------------------------------------------------
# What memformer_fast.functional calls for backend="triton" (arguments already validated)
# --------------------------------------------------------------------------------------------


def memory_read_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Fused memory read: q [B, L, H, Dh], k, v [B, S, H, Dh] -> [B, L, H, Dh]."""
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
    """Fused memory write: q, k_self, v_self [B, S, H, Dh], k, v [B, L, H, Dh], token_mask [B, L]
    bool or None -> [B, S, H, Dh].

    The op's float32 output is rounded here, outside it, so that its backward sees the unrounded
    output (a no-op for float32 inputs).
    """
    o, _ = memory_write_fwd(q, k_self, v_self, k, v, token_mask, temperature, scale)
    return o.to(q.dtype)


def gated_memory_update(
    memory: Tensor, candidate: Tensor, bias: Tensor, gate_logits: Tensor | None, eps: float
) -> Tensor:
    """Fused gated BMN update: memory, candidate [B, S, D], bias [S, D], gate_logits [B, S, D] or
    None -> [B, S, D]."""
    return gated_memory_update_fwd(memory, candidate, bias, gate_logits, eps)
