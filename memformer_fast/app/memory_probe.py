"""Peak memory of one training step, in a fresh process: the one probe of the demo and the
benchmarks (``benchmarks/memory_probe.py``).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` above what was allocated before the step;
on the CPU the growth of the peak resident set size (``VmHWM``, reset just before the step) over
the resident set at that point. ``python -m memformer_fast.app.memory_probe '<JSON>'`` measures
one MRBP or BPTT step of the recall task and prints one JSON line (:func:`measure_peak_memory`
starts it).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import mrbp
from ..config import MemformerConfig
from ..model import Memformer
from .recall import RecallTask


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark where Linux allows it and return the RSS to measure from.

    ``ru_maxrss`` alone would be wrong here: Linux carries it over ``exec`` from the parent, so a
    child of a large process starts with the parent's peak and a small step shows no growth.
    ``/proc/self/status`` VmHWM belongs to this process's own address space.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        rss = _status_bytes("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return peak_rss()


# How each device's number is measured, for reports.
MEASURED_AS = {
    "cuda": "torch.cuda.max_memory_allocated of one step, fresh process",
    "cpu": "growth of the peak RSS during one step, fresh process",
}


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Run ``step()`` once; return ``(peak, baseline)`` in MiB: the memory the step added at its
    peak, and what was in use before it (CUDA: allocated by torch; CPU: the resident set).

    Call it after a warm-up step, in a process that measures nothing else (module docstring).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = reset_peak_rss()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss()
    return (peak - base) / 2**20, base / 2**20


def measure_peak_memory(
    runs: Sequence[tuple[str, int]], *, config: dict, batch_size: int, device: str, seed: int = 0
) -> dict[str, dict]:
    """Peak memory of one training step of the recall task for each ``(method, num_segments)``
    of ``runs`` (``method`` "mrbp" or "bptt"), each in a fresh process; all run at once.

    ``config``: :meth:`MemformerConfig.to_dict` of the model. Returns ``{"method@T": {"peak_mb":
    ..., "what": ...}}``. A fresh process makes a measurement independent of whatever ran before;
    each measures after building the model and warm-up steps on a short rollout.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    procs = {}
    for method, num_segments in runs:
        args = dict(method=method, config=config, batch_size=batch_size,
                    num_segments=num_segments, device=device, seed=seed)  # fmt: skip
        procs[f"{method}@{num_segments}"] = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the memory probe {name} failed:\n{err.strip()}")
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def probe_step(raw: str) -> None:
    """Child side of :func:`measure_peak_memory`: prints one JSON line."""
    args = json.loads(raw)
    torch.manual_seed(args["seed"])
    torch.set_num_threads(1)  # several probes run at once; threads do not change the memory
    device = torch.device(args["device"])
    model = Memformer(MemformerConfig.from_dict(args["config"])).to(device)
    task = RecallTask(segment_length=model.config.segment_length)
    ids, labels, _ = task.sample(args["batch_size"], args["num_segments"])
    ids, labels = ids.to(device), labels.to(device)
    # Warm-up: one MRBP and one BPTT step on two segments of one sequence. Lazy initialisation
    # (autograd engine, kernel workspaces, .grad tensors) is not the rollout's cost, and a batch
    # of one leaves too little in the allocator's caches to hide the step's own allocations.
    L = model.config.segment_length
    mrbp.backward(model, ids[:1, : 2 * L], labels=labels[:1, -2 * L :])
    model.sequence_loss(ids[:1, : 2 * L], labels=labels[:1, -2 * L :])[0].backward()

    def step() -> None:
        if args["method"] == "mrbp":
            mrbp.backward(model, ids, labels=labels)
        else:
            model.sequence_loss(ids, labels=labels)[0].backward()

    peak, _ = peak_memory_mib(step, device)
    print(json.dumps({"peak_mb": peak, "what": MEASURED_AS[device.type]}))


if __name__ == "__main__":
    probe_step(sys.argv[1])
