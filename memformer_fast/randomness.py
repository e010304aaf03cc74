"""Per-segment dropout randomness shared by full BPTT, MRBP and the replay, private to the call.

A rollout draws one seed from the global generator when it starts; each part of the model on each
segment then draws its dropout masks from a generator of its own, seeded by ``(rollout seed,
segment, part)``. The critical-path pass of MRBP skips the decoder, so program-order draws from
one shared generator would give the encoder other masks than in BPTT; derived seeds make both paths
identical.

The generator belongs to the call: :func:`seeded` makes a new ``torch.Generator`` (on the model's
device) and publishes it to :class:`Dropout` through a context variable, which is private to the
thread (and to an asyncio task). The process-wide generators are never seeded or restored, so
another thread drawing random numbers neither disturbs the masks nor sees repeated numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor, nn

ENCODER = 0  # the encoder (or the decoder-only stack) and the memory writer
DECODER = 1  # the decoder of the encoder-decoder architecture

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1

# The generator that Dropout draws from in the current thread; None = the global generator.
_ACTIVE: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar(
    "memformer_fast_dropout_generator", default=None
)


def rollout_seed_tensor() -> Tensor:
    """The rollout seed as a ``[1]`` int64 tensor: one draw from the global CPU generator, made
    when a rollout starts (the plan reads it with its other values, in one host read)."""
    return torch.randint(0, 2**62, (1,))


def draw_rollout_seed() -> int:
    """The rollout seed as a Python int (:func:`rollout_seed_tensor`, read now)."""
    return int(rollout_seed_tensor().item())


def _mix(x: int, salt: int) -> int:
    """splitmix64 finaliser: nearby inputs give unrelated 63-bit seeds."""
    z = (x + 0x9E3779B97F4A7C15 * (salt + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def segment_seed(rollout_seed: int, segment: int) -> int:
    """The seed of segment ``segment`` of a rollout: what the replay buffer stores with it."""
    return _mix(rollout_seed, segment)


def part_seed(seed: int | None, part: int) -> int | None:
    """The seed of one part (``ENCODER`` or ``DECODER``) of a segment; None stays None."""
    return None if seed is None else _mix(seed, part)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[torch.Generator | None]:
    """Make :class:`Dropout` in the body (this thread only) draw from a new generator on
    ``device`` seeded by ``seed``; yields that generator.

    Nothing global is touched. ``seed=None`` makes the body's dropout draw from the global
    generators, as ``nn.Dropout`` does (a generator of an enclosing call does not leak in).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    token = _ACTIVE.set(generator)
    try:
        yield generator
    finally:
        _ACTIVE.reset(token)


def _draw_keep_mask(x: Tensor, p: float) -> Tensor:
    """0/1 in ``x``'s shape, dtype and device (contiguous), 1 with probability ``1 - p``, drawn from
    the active generator (the global one when none is active): one operator."""
    return torch.bernoulli(x, 1.0 - p, generator=_ACTIVE.get())


# Under torch.compile the draw is an opaque op (Dynamo cannot trace a generator or a context
# variable): it runs eagerly inside the compiled graph, so fullgraph=True works. The tag keeps the
# compiler from merging two draws or recomputing one in the backward. Defined with the low-level
# Library API rather than ``custom_op``: the op is called once per dropout site and segment, and
# custom_op's Python autograd layers would cost more than the draw itself; its input is detached,
# so it needs no autograd kernel.
_LIBRARY = torch.library.Library("memformer_fast", "FRAGMENT")
_LIBRARY.define(
    "dropout_keep_mask(Tensor x, float p) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,)
)
_LIBRARY.impl("dropout_keep_mask", _draw_keep_mask, "CompositeExplicitAutograd")


@torch.library.register_fake("memformer_fast::dropout_keep_mask", lib=_LIBRARY)
def _(x: Tensor, p: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_keep_mask_op = torch.ops.memformer_fast.dropout_keep_mask.default


def _draw_standard_normal(x: Tensor) -> Tensor:
    """Standard normal numbers in ``x``'s shape, dtype and device, drawn from the active
    generator (the global one when none is active): one operator."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=_ACTIVE.get())


# An opaque op under torch.compile, for the reasons of dropout_keep_mask above.
_LIBRARY.define(
    "standard_normal_like(Tensor x) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,)
)
_LIBRARY.impl("standard_normal_like", _draw_standard_normal, "CompositeExplicitAutograd")


@torch.library.register_fake("memformer_fast::standard_normal_like", lib=_LIBRARY)
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_standard_normal_op = torch.ops.memformer_fast.standard_normal_like.default


def standard_normal_like(x: Tensor) -> Tensor:
    """``torch.randn_like(x)`` drawn from the generator of the enclosing :func:`seeded` call
    (the global generator outside one), so a replay draws the same numbers."""
    if torch.compiler.is_compiling():
        return _standard_normal_op(x.detach())
    return _draw_standard_normal(x)


# Where ``x * (keep * scale)`` rounds exactly as ``x * keep * scale``: the scale is the same float
# in the mask as in a scalar multiplication. Half precision multiplies by a Python scalar in float32
# (opmath) but would round a scale stored in the mask to its own precision (1/0.9 -> 1.109375 in
# bfloat16, a biased dropout), so it keeps the separate pass.
_SCALE_IN_MASK = (torch.float32, torch.float64)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout`` whose mask comes from the generator of the enclosing :func:`seeded` call.

    ``x``: any shape. Zeroes each element with probability ``p`` and scales the rest by
    ``1 / (1 - p)``; the identity when not ``training`` or ``p == 0``. In float32 and float64 the
    scale is folded into the mask, so ``x`` is read once forward and the gradient once backward.
    """
    if not training or p == 0.0:
        return x
    if torch.compiler.is_compiling():
        keep = _keep_mask_op(x.detach(), p)
    else:
        keep = _draw_keep_mask(x.detach(), p)
    if x.dtype in _SCALE_IN_MASK:
        return x * keep.mul_(1.0 / (1.0 - p))
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing from the generator of the enclosing :func:`seeded` call (the global
    generator outside one). Same state dict (none) and arguments; never in place."""

    def forward(self, input: Tensor) -> Tensor:
        return dropout(input, self.p, self.training)
