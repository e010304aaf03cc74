"""The MRBP replay buffer (SPEC section 5).

Interim pure-Python implementation; the C++/CUDA extension ``memformer_fast._C`` replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ReplayBuffer:
    """Preallocated storage for ``capacity`` memory states of one shape and dtype.

    ``push`` copies a state in and returns its index; ``get`` returns it on ``device``;
    each entry carries an integer RNG seed that recreates its segment's randomness.
    """

    def __init__(
        self,
        capacity: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
        offload: bool = False,
    ) -> None:
        self.capacity, self.shape, self.dtype = capacity, tuple(shape), dtype
        self.device, self.offload = torch.device(device), offload
        where = "cpu" if offload else self.device
        self._storage = torch.empty((capacity, *self.shape), dtype=dtype, device=where)
        self._seeds = [0] * capacity
        self._size = 0

    def push(self, state: Tensor, rng_seed: int = 0) -> int:
        if self._size >= self.capacity:
            raise IndexError(f"ReplayBuffer is full (capacity {self.capacity})")
        self._storage[self._size].copy_(state)
        self._seeds[self._size] = rng_seed
        self._size += 1
        return self._size - 1

    def get(self, index: int) -> Tensor:
        if not 0 <= index < self._size:
            raise IndexError(f"index must be in [0, {self._size}), got {index}")
        return self._storage[index].to(self.device, copy=True)

    def rng_seed(self, index: int) -> int:
        if not 0 <= index < self._size:
            raise IndexError(f"index must be in [0, {self._size}), got {index}")
        return self._seeds[index]

    def prefetch(self, index: int) -> None:
        """Hint that ``get(index)`` comes next (used by the offloading implementation)."""

    def pop(self) -> Tensor:
        state = self.get(self._size - 1)
        self._size -= 1
        return state

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._size = 0

    def nbytes(self, where: str = "device") -> int:
        on_host = self.offload or self.device.type == "cpu"
        total = self._storage.numel() * self._storage.element_size()
        return total if (where == "host") == on_host else 0
