"""Peak resident memory of one training step, measured in a fresh process (CPU, Linux).

Usage: ``python benchmarks/memory_probe.py '<RolloutCase as JSON>'``; prints one JSON line.

The process imports torch, warms up on a 2-segment version of the case (lazy initialisation,
library code paged in on first use), builds the case's model and inputs (:func:`workloads.build`),
and measures the step with :func:`memformer_fast.app.memory_probe.peak_memory_mib`: it records the
resident set (``VmRSS``), resets the kernel's high-water mark (writing ``5`` to
``/proc/self/clear_refs``), runs the step and reads the high-water mark (``VmHWM``). The reported
``peak_mb`` is ``VmHWM - VmRSS``: the memory the step added at its peak (gradients, activations,
replay buffers, temporaries) on top of the interpreter, torch, the model and its inputs.
:func:`harness.cpu_peak_mb` starts the process with a fixed glibc mmap threshold, so freed tensors
go back to the system instead of staying resident in the allocator's cache, and a fresh process
per case keeps earlier cases out of the measurement.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
from harness import apply_thread_setting
from workloads import RolloutCase, build

from memformer_fast.app.memory_probe import peak_memory_mib

CPU = torch.device("cpu")


def main(argv: list[str]) -> None:
    apply_thread_setting()
    case = RolloutCase(**json.loads(argv[1]))
    # Warm-up on a 2-segment version of the case: lazy initialisation and library code paged in
    # on first use stay out of the peak.
    _, warm_up = build(dataclasses.replace(case, segments=min(case.segments, 2)), CPU)
    warm_up()
    del _, warm_up
    _, step = build(case, CPU)
    peak, baseline = peak_memory_mib(step, CPU)
    print(
        json.dumps(
            {
                "peak_mb": peak,
                "baseline_rss_mb": baseline,
                "method": "fresh process per case, after a warm-up step: "
                "VmHWM - VmRSS over one step",
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv)
