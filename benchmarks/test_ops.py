"""The three operations, forward and forward+backward, for every backend this machine has.

Backends: ``reference`` (eager PyTorch), ``compile`` (the reference under ``torch.compile``,
``dynamic=True``: one compilation per operation, dtype and mode), ``triton`` (the fused kernels,
CUDA only: the interpreter is never timed) and ``sdpa`` (``scaled_dot_product_attention``, memory
read only). The backward runs with a random upstream gradient (``torch.autograd.grad``).

Shapes: on CUDA B=8, H=8, Dh=64, L in {512, 4096}, S in {32, 256}, float32 and bfloat16; on the CPU
B=2, H=4, Dh=32, L in {256, 1024}, S in {16, 64}, float32, and ``compile`` only forward+backward
(each compilation costs tens of seconds on two cores). ``compile`` runs in the full set only
(``--benchmark-long``). On CUDA every case also reports the bytes the operation must move and the
fraction of the copy-bandwidth floor it reaches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, ON_CUDA, Rotation, bandwidth_info, full_set, rounds, run_benchmark
from torch import Tensor

from memformer_fast import functional
from memformer_fast.backends import interpreter_enabled, triton_available

if ON_CUDA:
    BATCH, HEADS, HEAD_DIM = 8, 8, 64
    LENGTHS, SLOTS = (512, 4096), (32, 256)
    DTYPES = (torch.float32, torch.bfloat16)
    BACKENDS = ("reference", "compile", "triton")
else:
    BATCH, HEADS, HEAD_DIM = 2, 4, 32
    LENGTHS, SLOTS = (256, 1024), (16, 64)
    DTYPES = (torch.float32,)
    BACKENDS = ("reference", "compile")
if not full_set():  # each compilation costs tens of seconds on a loaded CPU
    BACKENDS = tuple(b for b in BACKENDS if b != "compile")
MODES = ("fwd", "fwd+bwd")
WRITE_TEMPERATURE = 0.5  # the model's default

FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "memory_read": functional.memory_read_attention,
    "memory_write": functools.partial(
        functional.memory_write_attention, temperature=WRITE_TEMPERATURE
    ),
    "gated_update": functional.gated_memory_update,
}


def _sdpa_read(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The memory read as ``scaled_dot_product_attention`` on the ``[B, H, L, Dh]`` views."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


@functools.cache
def implementation(op: str, backend: str) -> Callable[..., Tensor]:
    """The callable that runs ``op`` on ``backend`` (compiled ones are built once and shared)."""
    if backend == "sdpa":
        return _sdpa_read
    if backend == "compile":
        return torch.compile(functools.partial(FUNCTIONS[op], backend="reference"), dynamic=True)
    return functools.partial(FUNCTIONS[op], backend=backend)


def input_shapes(op: str, length: int, slots: int) -> list[tuple[int, ...]]:
    """The shapes of ``op``'s tensor arguments, in call order."""
    tokens, memory = (BATCH, length, HEADS, HEAD_DIM), (BATCH, slots, HEADS, HEAD_DIM)
    if op == "memory_read":
        return [tokens, memory, memory]
    if op == "memory_write":
        return [memory, memory, memory, tokens, tokens]
    width = HEADS * HEAD_DIM
    return [(BATCH, slots, width), (BATCH, slots, width), (slots, width), (BATCH, slots, width)]


def output_shape(op: str, length: int, slots: int) -> tuple[int, ...]:
    if op == "memory_read":
        return (BATCH, length, HEADS, HEAD_DIM)
    if op == "memory_write":
        return (BATCH, slots, HEADS, HEAD_DIM)
    return (BATCH, slots, HEADS * HEAD_DIM)


def bytes_moved(op: str, mode: str, length: int, slots: int, dtype: torch.dtype) -> int:
    """The least traffic of the operation: inputs read and output written once (forward); the
    backward reads the inputs, the output and its gradient and writes every input gradient."""
    size = torch.finfo(dtype).bits // 8
    n_in = sum(torch.Size(s).numel() for s in input_shapes(op, length, slots))
    n_out = torch.Size(output_shape(op, length, slots)).numel()
    forward = n_in + n_out
    return size * (forward if mode == "fwd" else forward + 2 * n_in + 2 * n_out)


def cases() -> list[Any]:
    """Every (op, backend, mode, dtype, L, S) this device runs; L is None for the update."""
    params = []
    for op in FUNCTIONS:
        backends = BACKENDS + (("sdpa",) if op == "memory_read" else ())
        lengths: tuple[int | None, ...] = (None,) if op == "gated_update" else LENGTHS
        for backend in backends:
            for mode in MODES:
                if backend == "compile" and mode == "fwd" and not ON_CUDA:
                    continue
                for dtype in DTYPES:
                    for length in lengths:
                        for slots in SLOTS:
                            name = str(dtype).removeprefix("torch.")
                            shape = f"S{slots}" if length is None else f"L{length}-S{slots}"
                            params.append(
                                pytest.param(
                                    op,
                                    backend,
                                    mode,
                                    dtype,
                                    length,
                                    slots,
                                    id=f"{op}-{mode}-{backend}-{name}-{shape}",
                                )
                            )
    return params


@pytest.mark.parametrize(("op", "backend", "mode", "dtype", "length", "slots"), cases())
def test_op(
    benchmark: Any,
    op: str,
    backend: str,
    mode: str,
    dtype: torch.dtype,
    length: int | None,
    slots: int,
) -> None:
    if backend == "triton" and (interpreter_enabled() or not triton_available()):
        pytest.skip("Triton kernels are timed on CUDA only, never under TRITON_INTERPRET")
    fn = implementation(op, backend)
    length_ = length or 0
    shapes = input_shapes(op, length_, slots)
    grad = mode == "fwd+bwd"
    out_shape = output_shape(op, length_, slots)

    def make() -> list[Tensor]:
        args = [torch.randn(s, device=DEVICE, dtype=dtype).requires_grad_(grad) for s in shapes]
        return args + [torch.randn(out_shape, device=DEVICE, dtype=dtype)]

    moved = bytes_moved(op, mode, length_, slots, dtype)
    inputs = Rotation(make, moved)

    def step() -> None:
        *args, grad_out = inputs()
        if not grad:
            with torch.no_grad():
                fn(*args)
            return
        torch.autograd.grad(fn(*args), args, grad_out)

    dtype_name = str(dtype).removeprefix("torch.")
    benchmark.group = f"{op} {mode} {dtype_name} " + (
        f"S={slots}" if length is None else f"L={length} S={slots}"
    )
    info: dict[str, object] = {
        "suite": "ops",
        "op": op,
        "mode": mode,
        "backend": backend,
        "dtype": dtype_name,
        "B": BATCH,
        "H": HEADS,
        "Dh": HEAD_DIM,
        "L": length,
        "S": slots,
    }
    if ON_CUDA:
        info.update(bandwidth_info(moved, step))
    run_benchmark(benchmark, step, info, timed_rounds=rounds(cpu=10, cuda=30), warmup_rounds=2)
