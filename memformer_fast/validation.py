"""Validation of a model's inputs: each check names the argument, what it expects and what it got,
and raises before anything runs (so nothing changes on bad input).

Used by the model's forward, the rollouts (:mod:`memformer_fast.rollout`), generation
(:mod:`memformer_fast.generation`), :func:`memformer_fast.mrbp.backward` and the Hugging Face
wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # type hints only: the model imports this module
    from .model import Memformer

IGNORE_INDEX = -100
_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class HostReads:
    """Values computed on the device that the host needs, read together with ONE host read.

    Each :meth:`add` queues a tensor (flattened to int64) and, optionally, a check of its values
    that raises on bad input; :meth:`read` reads everything at once, runs the checks in the order
    they were queued and returns each part's values. A rollout's plan needs a dozen numbers (the
    id range, the labels' validity, the target count of each segment, which segments reset a
    row...): read one by one, each would make the host wait for the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._parts: list[Tensor] = []
        self._checks: list[Callable[[list[int]], None] | None] = []

    def add(self, values: Tensor, check: Callable[[list[int]], None] | None = None) -> int:
        """Queue ``values`` (any shape, integer or bool, on any device); return its part index."""
        self._parts.append(values.reshape(-1).to(self.device, torch.int64, non_blocking=True))
        self._checks.append(check)
        return len(self._parts) - 1

    def read(self) -> list[list[int]]:
        """One host read of every queued part, then the checks in order: ``[values per part]``."""
        if not self._parts:
            return []
        flat = torch.cat(self._parts).tolist()
        parts, start = [], 0
        for part in self._parts:
            parts.append(flat[start : start + part.numel()])
            start += part.numel()
        for check, values in zip(self._checks, parts):
            if check is not None:
                check(values)
        return parts


def check_ids(
    model: Memformer,
    name: str,
    ids: object,
    max_length: int | None = None,
    reads: HostReads | None = None,
) -> Tensor:
    """``ids`` is ``[B, L]`` integer token ids in ``[0, vocab_size)`` on the model's device, with
    ``L <= max_length`` when given; returned as int64. With ``reads``, the range check (the one
    that needs the values) is queued there instead of read now."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, L] with B, L >= 1, got {list(ids.shape)}")
    if max_length is not None and ids.shape[1] > max_length:
        raise ValueError(
            f"{name} has {ids.shape[1]} tokens, more than segment_length={max_length}; "
            "use sequence_loss or mrbp.backward for a rollout of several segments"
        )
    if ids.device != model.device:
        raise ValueError(f"{name} must be on the model's device {model.device}, got {ids.device}")
    vocab_size = model.config.vocab_size

    def check_range(lo_hi: list[int]) -> None:
        lo, hi = lo_hi
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{name} must hold ids in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]"
            )

    lo_hi = torch.stack(torch.aminmax(ids))
    if reads is None:
        check_range(lo_hi.tolist())
    else:
        reads.add(lo_hi, check_range)
    return ids.long()


def check_mask(name: str, mask: object, like: Tensor) -> Tensor | None:
    """``mask`` is None or a bool/integer tensor of ``like``'s shape and device (1 = real token);
    returned as bool, or None when every token is real."""
    mask = mask_format(name, mask, like)
    return None if mask is None or bool(mask.all()) else mask


def mask_format(name: str, mask: object, like: Tensor) -> Tensor | None:
    """:func:`check_mask` without reading the values: the mask as bool (or None when not given),
    even when every token is real."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (1 = real token), got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {list(like.shape)}, got {list(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} must be on {like.device}, got {mask.device}")
    return mask.bool()


def check_memory(
    model: Memformer,
    memory: object,
    batch_size: int,
    reads: HostReads | None = None,
    finite: bool = True,
) -> Tensor:
    """``memory`` is ``[batch_size, S, D]`` in ``memory_dtype`` on the model's device and finite
    (unless ``finite=False``); None gives the initial memory ``model.init_memory(batch_size)``.
    With ``reads``, the finiteness check (the one that needs the values) is queued there.

    A NaN or infinity in a memory is refused rather than propagated: every later segment of that
    row would read it (NaN logits and loss; generation emitted token 0 for ever).
    """
    if memory is None:
        return model.init_memory(batch_size)
    c = model.config
    if not isinstance(memory, Tensor):
        raise TypeError(f"memory must be a torch.Tensor or None, got {type(memory).__name__}")
    expected = [batch_size, c.n_memory_slots, c.d_model]
    if list(memory.shape) != expected:
        raise ValueError(f"memory must have shape {expected} [B, S, D], got {list(memory.shape)}")
    if memory.dtype != c.memory_dtype:
        raise TypeError(f"memory must have dtype memory_dtype={c.memory_dtype}, got {memory.dtype}")
    if memory.device != model.device:
        raise ValueError(
            f"memory must be on the model's device {model.device}, got {memory.device}"
        )
    if finite:

        def check_finite(rows: list[int]) -> None:
            if not all(rows):
                raise ValueError(
                    f"memory must be finite, got NaN or infinity in batch row {rows.index(0)} "
                    "(from a diverged step? start that row again from init_memory)"
                )

        rows = torch.isfinite(memory).flatten(1).all(1)
        if reads is None:
            check_finite(rows.tolist())
        else:
            reads.add(rows, check_finite)
    return memory


def check_resets(
    model: Memformer, name: str, resets: object, shape: list[int], meaning: str
) -> Tensor | None:
    """``resets`` is None or a bool tensor of exactly ``shape`` on the model's device."""
    if resets is None:
        return None
    if not isinstance(resets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = restart that row's memory), got {resets.dtype}"
        )
    if list(resets.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {meaning}, got {list(resets.shape)}")
    if resets.device != model.device:
        raise ValueError(
            f"{name} must be on the model's device {model.device}, got {resets.device}"
        )
    return resets


def check_labels(
    model: Memformer, labels: object, like: Tensor, reads: HostReads | None = None
) -> Tensor:
    """``labels`` has ``like``'s shape and device and holds ids in ``[0, vocab_size)`` or -100
    (ignored); returned as int64. With ``reads``, the value check is queued there."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in _ID_DTYPES:  # the dtypes input_ids takes (uint8 holds no -100)
        raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
    if labels.shape != like.shape:
        raise ValueError(f"labels must have shape {list(like.shape)}, got {list(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"labels must be on {like.device}, got {labels.device}")
    vocab_size = model.config.vocab_size
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))

    def check_values(any_bad: list[int]) -> None:
        if any_bad[0]:
            raise ValueError(
                f"labels must be token ids in [0, {vocab_size}) or {IGNORE_INDEX}, "
                f"got {labels[bad][0].item()}"
            )

    if reads is None:
        check_values([int(bad.any())])
    else:
        reads.add(bad.any(), check_values)
    return labels.long()
