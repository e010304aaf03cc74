"""Per-segment dropout randomness shared by full BPTT, MRBP and the replay (SPEC 4.3).

A rollout draws one seed from the global generator when it starts; each part of the model on each
segment then draws its dropout masks from a generator seeded by ``(rollout seed, segment, part)``.
The critical-path pass of MRBP skips the decoder, so program-order draws from the global generator
would give the encoder other masks than in BPTT; derived seeds make both paths identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ENCODER = 0  # the encoder (or the decoder-only stack) and the memory writer
DECODER = 1  # the decoder of the encoder-decoder architecture

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def draw_rollout_seed() -> int:
    """One draw from the global CPU generator, made when a rollout starts."""
    return int(torch.randint(0, 2**62, (1,)).item())


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
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the body with the CPU (and ``device``'s CUDA) generator seeded by ``seed``.

    The global generators are restored afterwards. ``seed=None`` leaves them alone (no dropout).
    """
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
