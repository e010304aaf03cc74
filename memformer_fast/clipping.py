"""Gradient clipping that also stops single-batch spikes: the recipe the memory learns with.

A fixed threshold (1.0) bounds the early, large gradients, but once a Memformer has solved its task
its gradient norm falls to about 0.01 and Adam's second moment with it. A single batch that
returns a norm of 30 to 200 is then clipped to 1.0, still 100 times the recent norms, and Adam
turns it into a step of tens of learning rates in every coordinate it touches: the recall of a
solved model can collapse for good (docs/memory_learning.md, items 6 and 9). :class:`SpikeClip`
also clips to a multiple of the running mean of the recent (clipped) norms, so no step is much
larger than the ones before it, while a lasting rise of the gradient (a new curriculum stage)
still passes within a few updates: the limit grows by up to ``momentum + (1 - momentum) * factor``
per update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

DEFAULT_FACTOR = 4.0  # the relative limit of SpikeClip, and of `memformer-fast train`
# A total norm below this (clip_grad_norm_'s own epsilon: it scales by max_norm / (norm + 1e-6))
# says nothing about the scale of the gradients to come: an all-zero gradient, or a vanishing one,
# is neither clipped nor averaged in: averaged in, one all-zero gradient would make the running
# mean, and so the limit, 0 for good, and a vanishing first norm would hold the limit near 0 for
# as many updates as the mean takes to forget it.
TINY_NORM = 1e-6

# torch >= 2.6: one foreach norm per device and dtype, the partial norms gathered on the first
# device (as clip_grad_norm_ does); older torch: one norm per tensor (the same numbers on one
# device and dtype).
_total_norm = getattr(
    torch.nn.utils,
    "get_total_norm",
    lambda grads: torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in grads])
    ),
)


class SpikeClip:
    """Clip the total gradient norm to ``min(max_norm, factor * running mean of clipped norms)``.

    Use it where ``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` would go::

        clip = SpikeClip()
        ...
        loss.backward()            # or mrbp.backward(model, ids, labels=labels)
        norm = clip(model.parameters())
        optimizer.step()

    Args:
        max_norm: the fixed upper limit (as in ``clip_grad_norm_``); ``inf`` for none.
        factor: how many times the running mean a norm may reach; ``inf`` turns the relative
            limit off (then this is ``clip_grad_norm_``).
        momentum: the running mean's decay per update (0.9: about the last 10 updates).

    The running mean is state: save it with :meth:`state_dict` next to the optimizer's to resume a
    run exactly.
    """

    def __init__(
        self, max_norm: float = 1.0, factor: float = DEFAULT_FACTOR, momentum: float = 0.9
    ) -> None:
        if not max_norm > 0:  # also rejects NaN
            raise ValueError(f"max_norm must be > 0 (inf: no fixed limit), got {max_norm}")
        if not factor >= 1:
            raise ValueError(f"factor must be >= 1 (inf: no relative limit), got {factor}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.max_norm = float(max_norm)
        self.factor = float(factor)
        self.momentum = float(momentum)
        self.running_norm: float | None = None  # None until the first update

    @property
    def limit(self) -> float:
        """The norm the next gradient is clipped to."""
        if self.running_norm is None or self.running_norm < TINY_NORM or math.isinf(self.factor):
            return self.max_norm
        return min(self.max_norm, self.factor * self.running_norm)

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> Tensor:
        """Clip the gradients of ``parameters`` in place; returns their total norm before
        clipping (a 0-d tensor, like ``clip_grad_norm_``).

        A non-finite norm leaves the gradients and the running mean unchanged (the caller decides
        whether to skip the update): one bad batch does not poison the limit. Nor does a norm
        below :data:`TINY_NORM` (an all-zero gradient): it is not clipped and not averaged in.
        """
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = _total_norm(grads)
        value = float(norm)
        if not math.isfinite(value) or value < TINY_NORM:
            return norm
        limit = self.limit
        if value > limit:  # the same scale as clip_grad_norm_'s
            torch._foreach_mul_(grads, limit / (value + 1e-6))
        clipped = min(value, limit)
        self.running_norm = (
            clipped
            if self.running_norm is None
            else self.momentum * self.running_norm + (1 - self.momentum) * clipped
        )
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"running_norm": self.running_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: ``state`` is not ``{"running_norm": None or a finite float >= 0}``
                (nothing is changed).
        """
        if not isinstance(state, dict) or set(state) != {"running_norm"}:
            raise ValueError(f"state must be a dict with the key 'running_norm', got {state!r}")
        running = state["running_norm"]
        if running is not None and not (
            isinstance(running, (int, float))
            and not isinstance(running, bool)
            and math.isfinite(running)
            and running >= 0
        ):
            raise ValueError(
                f"state['running_norm'] must be None or a finite float >= 0, got {running!r}"
            )
        self.running_norm = None if running is None else float(running)
