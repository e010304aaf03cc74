"""Shared machinery of the benchmark suite: device choice, timing, peak memory, bandwidth.

Everything runs on CUDA when a GPU is present (the full sizes) and on the CPU otherwise (scaled-down
sizes). Timing goes through ``benchmark.pedantic`` with warm-up rounds; on CUDA the timed function
synchronises the device so wall clock covers the GPU work. Peak memory is measured per case:

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` just before the
  measured call (the model, its inputs and nothing else are alive then; gradients start as None);
- CPU: a fresh Python process per case (:mod:`memory_probe`) builds the model and the inputs,
  runs one warm-up call, drops the gradients, resets the kernel's peak-RSS counter
  (``/proc/self/clear_refs``), runs the call once more, and reports ``VmHWM`` (the resident-set
  high-water mark) minus ``VmRSS`` just before that call.

In both cases "peak MB" is what the call adds on top of the model and its inputs: gradients,
activations, replay buffers and temporaries.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
MB = 1024**2
L2_FLUSH_BYTES = 256 * MB  # rotate inputs through more than the H200's 60 MB L2 (x4)
THREADS_ENV = "MEMFORMER_BENCH_THREADS"
# "1" (or ``--benchmark-long``, which sets it) runs the full set; by default the cases that cost
# the most for what they add (compiled references, the longest rollouts, the peer at T = 16) stay
# out, so the suite fits in minutes on a shared 2-core CPU.
FULL_ENV = "MEMFORMER_BENCH_FULL"
PEER_INSTALL = "pip install --no-deps memformer==0.3.1 einops"
PROBE = Path(__file__).with_name("memory_probe.py")


def full_set() -> bool:
    """Whether the full benchmark set was asked for (``--benchmark-long`` or ``FULL_ENV=1``)."""
    return os.environ.get(FULL_ENV, "") == "1"


def installed_version(package: str) -> str | None:
    """The installed version of ``package`` (``"memformer"``: the peer), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def apply_thread_setting() -> None:
    """Set torch's CPU thread count: ``MEMFORMER_BENCH_THREADS`` when it is given, else one
    thread on the CPU. The CPU sizes are small, and on a machine whose cores other jobs share,
    OpenMP threads that wait for one another run many times slower than one thread."""
    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))
    elif not ON_CUDA:
        torch.set_num_threads(1)


def synchronize() -> None:
    """Wait for the device, so that wall clock covers the GPU work."""
    if ON_CUDA:
        torch.cuda.synchronize()


def rounds(cpu: int, cuda: int) -> int:
    """The number of timed rounds on this device."""
    return cuda if ON_CUDA else cpu


def run_benchmark(
    benchmark: Any,
    fn: Callable[[], object],
    extra_info: dict[str, object],
    *,
    timed_rounds: int,
    warmup_rounds: int = 1,
) -> float:
    """Time ``fn`` with ``benchmark.pedantic`` (synchronised) and return the median in seconds."""
    benchmark.extra_info.update(extra_info)
    benchmark.extra_info.setdefault("device", device_name())

    def timed() -> None:
        fn()
        synchronize()

    benchmark.pedantic(timed, rounds=timed_rounds, warmup_rounds=warmup_rounds, iterations=1)
    return float(benchmark.stats.stats.median)


def device_name() -> str:
    """The GPU's name, or the CPU's model name."""
    if ON_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


class Rotation:
    """Cycles through copies of a kernel's inputs so a timed loop does not run out of L2.

    ``make()`` builds one set of arguments; on CUDA enough sets are kept to move at least
    ``L2_FLUSH_BYTES`` per cycle (at most 32); on the CPU one set is kept.
    """

    def __init__(self, make: Callable[[], Sequence[Any]], bytes_per_call: int) -> None:
        count = min(32, math.ceil(L2_FLUSH_BYTES / max(bytes_per_call, 1))) if ON_CUDA else 1
        self.sets = [tuple(make()) for _ in range(count)]
        self._next = 0

    def __call__(self) -> tuple[Any, ...]:
        args = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return args


def cuda_time_per_call(fn: Callable[[], object], calls: int = 50) -> float:
    """Seconds per call of ``fn`` launched back to back between two CUDA events (after warm-up)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


_COPY_BANDWIDTH: list[float] = []


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), measured once."""
    if not _COPY_BANDWIDTH:
        n = 256 * MB  # float32 elements: 1 GiB each way
        src = torch.randn(n, device=DEVICE)
        dst = torch.empty_like(src)
        seconds = cuda_time_per_call(lambda: dst.copy_(src), calls=20)
        _COPY_BANDWIDTH.append(2 * src.numel() * src.element_size() / seconds)
        del src, dst
    return _COPY_BANDWIDTH[0]


def bandwidth_info(bytes_moved: int, fn: Callable[[], object]) -> dict[str, float]:
    """``extra_info`` entries that put a CUDA kernel against its bandwidth floor.

    ``bytes_moved`` is what the operation must read and write at least (each input and output
    once); the floor is ``bytes_moved / copy bandwidth``; ``fraction_of_floor`` is that floor over
    the CUDA-event time per call (1.0 = as fast as a copy of the same bytes).
    """
    seconds = cuda_time_per_call(fn)
    bandwidth = copy_bandwidth()
    return {
        "bytes_moved": bytes_moved,
        "kernel_ms": seconds * 1e3,
        "achieved_GBps": bytes_moved / seconds / 1e9,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "fraction_of_floor": bytes_moved / bandwidth / seconds,
    }


def cuda_peak_mb(fn: Callable[[], object], model: torch.nn.Module | None = None) -> float:
    """MB that one call of ``fn`` allocates on the GPU at its peak, over what was alive before."""
    if model is not None:
        model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if model is not None:
        model.zero_grad(set_to_none=True)
    return peak / MB


def cpu_peak_mb(spec: dict[str, object]) -> dict[str, object]:
    """Run :mod:`memory_probe` on ``spec`` in a fresh process and return its JSON report."""
    import memformer_fast

    # The child imports the very package this process benchmarks, wherever it was found.
    env = os.environ.copy()
    package_root = str(Path(memformer_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    # A fixed mmap threshold: tensors of 64 KiB and more are mapped and unmapped, so resident
    # memory follows the live tensors (glibc otherwise raises the threshold as blocks are freed).
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    result = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed for {spec}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_memory_info(
    spec: dict[str, object], model: torch.nn.Module, step: Callable[[], object]
) -> dict[str, object]:
    """Peak-memory ``extra_info`` of one call of ``step``.

    On CUDA ``step`` is measured here; on the CPU a fresh process rebuilds the case from ``spec``
    (see :mod:`memory_probe`), because a process's resident memory keeps the history of
    everything it ran before.
    """
    if ON_CUDA:
        return {"peak_mb": cuda_peak_mb(step, model), "memory_measure": "cuda max_memory_allocated"}
    if not Path("/proc/self/clear_refs").exists():
        return {"peak_mb": None, "memory_measure": "not measured: the CPU probe needs Linux /proc"}
    report = cpu_peak_mb(spec)
    return {
        "peak_mb": report["peak_mb"],
        "baseline_rss_mb": report["baseline_rss_mb"],
        "memory_measure": report["method"],
    }
