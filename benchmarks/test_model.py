"""Training-step throughput of the encoder-decoder Memformer, per backend, in tokens per second.

One step is one segment of a rollout: the encoder reads ``s_t`` and the writer updates the memory,
the decoder predicts ``s_{t+1}`` (teacher-forced), then one backward through the loss and through
the new memory (its upstream gradient stands for the later segments' contribution). Tokens per
second counts the ``B * L`` tokens the step predicts.

CUDA: the paper's WikiText-103 size (d_model 512, 8 heads, d_ff 2048, 4 encoder + 8 decoder layers,
32 slots, segment 64; 32k vocabulary), batch 32, backends ``reference`` and ``triton``, float32 and
bfloat16 autocast. CPU: the ``cpu-small`` size (d_model 128, 2 + 4 layers), batch 8, reference,
float32.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from harness import DEVICE, ON_CUDA, rounds, run_benchmark
from workloads import SIZES, parameter_count, train_step

from memformer_fast.backends import interpreter_enabled

if ON_CUDA:
    SIZE, BATCH = "paper", 32
    BACKENDS, DTYPES = ("reference", "triton"), (torch.float32, torch.bfloat16)
else:
    SIZE, BATCH = "cpu-small", 8
    BACKENDS, DTYPES = ("reference",), (torch.float32,)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark: Any, backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and interpreter_enabled():
        pytest.skip("Triton kernels are timed on CUDA only, never under TRITON_INTERPRET")
    model, step = train_step(SIZE, backend, dtype, BATCH, DEVICE)
    tokens = BATCH * model.config.segment_length
    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"train step {SIZE} {dtype_name}"
    median = run_benchmark(
        benchmark,
        step,
        {
            "suite": "model",
            "size": SIZE,
            "config": SIZES[SIZE],
            "parameters": parameter_count(model),
            "backend": backend,
            "dtype": dtype_name,
            "batch": BATCH,
            "tokens_per_step": tokens,
        },
        timed_rounds=rounds(cpu=5, cuda=20),
        warmup_rounds=2,
    )
    benchmark.extra_info["tokens_per_s"] = tokens / median
