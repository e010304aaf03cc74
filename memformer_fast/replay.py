"""The MRBP replay buffer: the Python face of the extension ``memformer_fast._C``.

What MRBP keeps and replays: docs/design.md, "Memory Replay Back-Propagation".

All the work (storage, copies, streams and events, argument checks) happens in C++ (``csrc/``);
this module loads the extension, refuses a missing or stale build with an ``ImportError`` that says
how to rebuild, and gives the class its documented, typed Python signature.

Offload storage (pinned host memory on a CUDA machine, where allocating it costs about a
millisecond per megabyte and a device-wide synchronisation) is reused: a buffer that is closed or
dropped hands its storage to :data:`offload_cache`, and the next offload buffer of the same
capacity, shape, dtype and device takes it instead of allocating. See :class:`OffloadCache`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import numbers
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

API_VERSION = 1  # must equal API_VERSION in csrc/bindings.cpp
REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` from the repository root"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _version_triple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _stale_sources(extension_file: Path) -> list[str]:
    """C++/CUDA sources newer than the built module, when running from a source checkout."""
    csrc = _SOURCE_ROOT / "csrc"
    if not (_SOURCE_ROOT / "setup.py").is_file() or not csrc.is_dir():
        return []  # an installed package: its sources are not around to compare with
    built = extension_file.stat().st_mtime
    return sorted(
        str(path.relative_to(_SOURCE_ROOT))
        for path in csrc.rglob("*")
        if path.suffix in {".h", ".cpp", ".cu"} and path.stat().st_mtime > built
    )


@functools.cache
def load_extension() -> ModuleType:
    """``memformer_fast._C``, checked against this Python code and the running torch.

    Raises:
        ImportError: the extension is missing, fails to load, or was built from other sources, for
            another API version or against another torch; the message says how to rebuild.
    """
    try:
        _C = importlib.import_module(f"{__package__}._C")
    except ImportError as error:
        raise ImportError(
            f"memformer_fast._C (the compiled replay buffer) cannot be imported ({error}); "
            + REBUILD_HINT
        ) from error
    problems = []
    if getattr(_C, "API_VERSION", None) != API_VERSION:
        problems.append(
            f"it has API version {getattr(_C, 'API_VERSION', None)}, this code needs {API_VERSION}"
        )
    if _version_triple(_C.TORCH_VERSION) != _version_triple(torch.__version__):
        problems.append(f"it was built for torch {_C.TORCH_VERSION}, running {torch.__version__}")
    stale = _stale_sources(Path(_C.__file__)) if _C.__file__ else []
    if stale:
        problems.append(f"these sources changed after it was built: {', '.join(stale)}")
    if problems:
        raise ImportError(f"memformer_fast._C is stale: {'; '.join(problems)}; " + REBUILD_HINT)
    return _C


_Key = tuple[int, tuple[int, ...], torch.dtype, torch.device]


def _allocate(
    capacity: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, offload: bool
) -> Any:
    """A new ``_C.ReplayBuffer``: where its storage (pinned with offload on CUDA) is allocated."""
    return load_extension().ReplayBuffer(capacity, shape, dtype, device, offload)


class OffloadCache:
    """The storage of one idle offload replay buffer, kept for the next buffer that fits.

    ``mrbp.backward(..., offload=True)`` makes a :class:`ReplayBuffer` per call; allocating its
    pinned host memory every time would cost more than the copies it serves. A closed (or dropped)
    offload buffer is cleared and parked here; a new offload buffer of the same capacity, shape,
    dtype and device takes it, so a training loop allocates once. A buffer of another
    configuration frees the parked storage before allocating its own (the memory is never held
    twice). Parked storage is empty: nothing of the previous owner's states is reachable, and the
    C++ storage orders its copies with events, so the next owner's pushes wait for any still in
    flight.

    The reuse logic is the same on every device; only what is saved differs: pinned host memory,
    its CUDA side stream, events and device staging slots on a CUDA machine, plain host memory on
    a CPU-only one. Thread-safe: a storage is owned by one buffer at a time.

    ``allocations`` and ``reuses`` count offload buffers made with new storage and with parked
    storage, since the process started.
    """

    def __init__(self) -> None:
        # Reentrant: a buffer collected (and parked) while this thread holds the lock is fine.
        self._lock = threading.RLock()
        self._parked: tuple[_Key, Any] | None = None
        self.allocations = 0
        self.reuses = 0

    def take(self, key: _Key) -> Any:
        """Storage for a new offload buffer of configuration ``key`` (parked or new)."""
        with self._lock:
            parked, self._parked = self._parked, None
            if parked is not None and parked[0] == key:
                self.reuses += 1
                return parked[1]
        del parked  # another configuration: free it before allocating the new one
        impl = _allocate(*key, True)
        with self._lock:
            self.allocations += 1
        return impl

    def park(self, impl: Any) -> None:
        """Keep ``impl`` (an empty ``_C.ReplayBuffer`` with offload) for the next buffer of its
        configuration; the storage parked before, if any, is freed."""
        key: _Key = (impl.capacity, tuple(impl.shape), impl.dtype, impl.device)
        with self._lock:
            previous, self._parked = self._parked, (key, impl)
        del previous  # freed outside the lock: a CUDA storage synchronises its streams

    def nbytes(self) -> int:
        """Host bytes held by the parked storage (0 when none)."""
        with self._lock:
            return 0 if self._parked is None else self._parked[1].nbytes("host")

    def release(self) -> int:
        """Free the parked storage now (pinned memory goes back to the system); returns the host
        bytes freed. The next offload buffer allocates again."""
        with self._lock:
            parked, self._parked = self._parked, None
        freed = 0 if parked is None else int(parked[1].nbytes("host"))
        del parked
        return freed


def _resolved(device: torch.device) -> torch.device:
    """``cuda`` without an index is the current CUDA device, as the extension resolves it: a
    storage parked for one device is never handed to a buffer meant for another."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


offload_cache = OffloadCache()
"""The process's :class:`OffloadCache`; ``offload_cache.release()`` frees what it holds."""


class ReplayBuffer:
    """Preallocated storage for ``capacity`` memory states of one shape and dtype.

    Each entry carries the integer seed that recreates its segment's randomness. With
    ``offload=True`` on a CUDA device the states live in pinned host memory and the device holds a
    few of them whatever the capacity: pushes copy out on a side stream ordered after the producer,
    and ``prefetch(i)`` brings entry ``i`` back while the caller computes.

    Args:
        capacity: the number of states it can hold (at least 1).
        shape: the shape of every state.
        dtype: the dtype of every state.
        device: where states are pushed from and returned to (``cpu`` or ``cuda``).
        offload: keep the states in host memory (pinned when CUDA is present).

    Raises:
        ImportError: the extension is missing or stale (see :func:`load_extension`).
        TypeError: ``capacity`` is not an int (a bool is not taken) or ``offload`` not a bool.
        ValueError: a non-positive capacity or size in ``shape``, or an unsupported device.
    """

    __slots__ = ("_impl", "_misses_before")

    def __init__(
        self,
        capacity: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str | int,
        offload: bool = False,
    ) -> None:
        # pybind11 would take True as capacity 1 and any truthy object as offload=True.
        if isinstance(capacity, bool) or not isinstance(capacity, (int, numbers.Integral)):
            raise TypeError(
                f"ReplayBuffer: capacity must be an int, got {type(capacity).__name__} {capacity!r}"
            )
        if not isinstance(offload, bool):
            raise TypeError(
                f"ReplayBuffer: offload must be a bool, got {type(offload).__name__} {offload!r}"
            )
        key: _Key = (int(capacity), tuple(shape), dtype, _resolved(torch.device(device)))
        self._impl: Any = offload_cache.take(key) if offload else _allocate(*key, False)
        self._misses_before = self._impl.fetch_misses  # a reused storage has counted before

    def close(self) -> None:
        """Empty the buffer and give up its storage: an offload buffer's goes to
        :data:`offload_cache` for reuse, any other's is freed. Any later use raises a
        ``RuntimeError``; closing twice does nothing. Dropping the buffer closes it."""
        impl, self._impl = self._impl, None
        if impl is None:
            return
        impl.clear()
        if impl.offload:
            offload_cache.park(impl)

    def __del__(self) -> None:
        # A failed __init__ left no storage; at interpreter shutdown the cache may be gone.
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _live(self) -> Any:
        if self._impl is None:
            raise RuntimeError("ReplayBuffer: the buffer was closed")
        return self._impl

    def push(self, state: Tensor, rng_seed: int = 0) -> int:
        """Copy ``state`` (any strides) into the next entry with its seed; returns its index.

        No memory is allocated. A failed push leaves the buffer unchanged.

        Raises:
            TypeError: ``state`` has another dtype (or is not a dense tensor).
            ValueError: ``state`` has another shape or lives on another device.
            IndexError: the buffer is full.
        """
        return self._live.push(state, rng_seed)

    def get(self, index: int) -> Tensor:
        """Entry ``index`` as a new tensor on ``device``, ready on the caller's current stream.

        The tensor is the caller's: later pushes never write to it.

        Raises:
            IndexError: ``index`` is not in ``[0, len(self))``.
        """
        return self._live.get(index)

    def rng_seed(self, index: int) -> int:
        """The seed pushed with entry ``index``."""
        return self._live.rng_seed(index)

    def prefetch(self, index: int) -> None:
        """Start copying entry ``index`` to the device (offload); else only check the index."""
        self._live.prefetch(index)

    def pop(self) -> Tensor:
        """Remove the last entry and return it as :meth:`get` would."""
        return self._live.pop()

    def clear(self) -> None:
        """Remove every entry (the storage stays allocated for reuse)."""
        self._live.clear()

    def nbytes(self, where: str = "device") -> int:
        """Bytes held in ``"device"`` or ``"host"`` memory."""
        return self._live.nbytes(where)

    def __len__(self) -> int:
        return len(self._live)

    def __repr__(self) -> str:
        if self._impl is None:
            return "ReplayBuffer(closed)"
        return (
            f"ReplayBuffer(len={len(self)}, capacity={self.capacity}, shape={self.shape}, "
            f"dtype={self.dtype}, device={self.device}, offload={self.offload})"
        )

    @property
    def capacity(self) -> int:
        return self._live.capacity

    @property
    def shape(self) -> tuple[int, ...]:
        return self._live.shape

    @property
    def dtype(self) -> torch.dtype:
        return self._live.dtype

    @property
    def device(self) -> torch.device:
        return self._live.device

    @property
    def offload(self) -> bool:
        return self._live.offload

    @property
    def fetch_misses(self) -> int:
        """With offload on CUDA: reads whose entry had not been prefetched, so they waited for
        its host-to-device copy (0 otherwise). MRBP's get(t) / prefetch(t - 1) walk makes none
        after the first read."""
        return self._live.fetch_misses - self._misses_before


def build_info() -> dict[str, Any]:
    """How ``memformer_fast._C`` was built, for ``python -m memformer_fast info``.

    Never raises: a missing or stale extension is reported under ``extension_error``.
    """
    info: dict[str, Any] = {
        "extension_built": False,
        "extension_error": None,
        "extension_path": None,
        "with_cuda": False,
        "cuda_archs": [],
        "cuda_compiled": None,
        "cuda_runtime": None,
        "compiler": None,
        "torch_built": None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        ext = load_extension()
    except ImportError as error:
        info["extension_error"] = str(error)
        return info
    info.update(
        extension_built=True,
        extension_path=ext.__file__,
        with_cuda=ext.WITH_CUDA,
        cuda_archs=[f"{arch // 100}.{arch % 100 // 10}" for arch in ext.CUDA_ARCHS],
        compiler=ext.COMPILER,
        torch_built=ext.TORCH_VERSION,
    )
    if ext.WITH_CUDA:
        info["cuda_compiled"] = _cuda_version(ext.CUDA_VERSION)
        info["cuda_runtime"] = _cuda_version(ext.cuda_runtime_version()) or None
    return info


def _cuda_version(version: int) -> str:
    """``13000`` -> ``"13.0"`` (the CUDART_VERSION encoding); ``0`` (unknown) -> ``""``."""
    return f"{version // 1000}.{version % 1000 // 10}" if version else ""
