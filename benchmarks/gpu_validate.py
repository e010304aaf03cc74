"""The stages of ``benchmarks/gpu_validate.sh`` that run Python: one GPU session's checks.

``python benchmarks/gpu_validate.py STAGE --out DIR [--dry-run]`` writes ``DIR/STAGE.json``:

- ``env``: GPU, driver, library versions, the CPU;
- ``correctness``: every kernel, forward and backward, at realistic shapes in bfloat16, float16
  and float32, outputs NaN-poisoned (``torch.empty`` fills floats with NaN, so an element a kernel
  forgets to write fails), against the float32 reference: float32 within 1e-4 relative error,
  16-bit within twice the same-dtype reference's error (flash-attention's rule);
- ``kernels``: each kernel's time (CUDA events, inputs rotated through more than the L2 cache)
  against its floor: the larger of bytes moved / measured copy bandwidth and FLOPs / measured
  bfloat16 matmul rate; ``scaled_dot_product_attention`` as the memory read's baseline;
- ``compiled``: the three ops chained (read, write, gated update), forward and backward, eager
  vs ``torch.compile`` (inductor) vs CUDA graphs (``mode="reduce-overhead"``) at the paper's step
  shape: the same values, the graphs' kernel launches (``triton_op``: no opaque op), no CUDA-graph
  skip, and the time per step (host-bound at these sizes, which is what compiling removes);
- ``training``: one MRBP training step of the paper's encoder-decoder model at T = 4 and 16
  segments, with and without offload: time, tokens/s, peak memory;
- ``report``: ``results.json`` (every stage's JSON, the stage log, the command) and ``results.md``.

``--dry-run`` runs the same code on the CPU through the Triton interpreter at tiny shapes (CI runs
it): the numbers mean nothing there, the code paths are the ones the GPU will run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before Triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--dry-run" in sys.argv:  # the interpreter as a GPU computes, as the test suite runs it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import triton_interpreter

    triton_interpreter.install()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (B, H, Dh, S, L) of the correctness checks: the realistic shapes and an odd one.
GPU_SHAPES = [(16, 8, 64, 64, 512), (32, 8, 128, 256, 2048), (3, 5, 40, 33, 777)]
DRY_SHAPES = [(2, 2, 24, 5, 17)]
# The timed shapes (bfloat16 and float32) and the training rollouts.
GPU_TIMED = [(16, 8, 64, 64, 512), (32, 8, 128, 256, 2048)]
DRY_TIMED = [(1, 2, 16, 5, 17)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------


def _run(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"


def stage_env(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": DEVICE.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version("triton"),
        "memformer_fast": version("memformer_fast"),
        "numpy": version("numpy"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:] or None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        env |= {
            "gpu": p.name,
            "gpu_memory_gib": round(p.total_memory / 2**30, 1),
            "sm": f"sm_{p.major}{p.minor}",
            "sms": p.multi_processor_count,
            "driver": _run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            ).splitlines()[0],
            "nvidia_smi": _run(["nvidia-smi"]),
        }
    else:
        env["gpu"] = "none (dry run on the CPU)"
        env["driver"] = None
    return env


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------


@contextmanager
def nan_poisoned_empty() -> Iterator[None]:
    """``torch.empty``/``empty_like`` return NaN-filled floats while the kernels run."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like  # type: ignore[assignment]


def _grads(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor, dtype
) -> list[torch.Tensor]:
    """Output and input gradients of ``fn`` on ``inputs`` cast to ``dtype``, upstream ``grad``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def _compare(names, actual, lowp, exact) -> list[dict[str, Any]]:
    """One row per tensor: its error, the same-dtype reference's, the ratio and the verdict."""
    rows = []
    for name, a, lo, ex in zip(names, actual, lowp, exact):
        finite = bool(torch.isfinite(a).all())
        err = relative_error(a, ex)
        row: dict[str, Any] = {"tensor": name, "finite": finite, "error": err}
        if a.dtype == torch.float32:
            row["passed"] = finite and err < 1e-4
        else:
            ref = relative_error(lo, ex)
            row |= {"reference_error": ref, "ratio": err / max(ref, 1e-12)}
            row["passed"] = finite and err <= 2 * ref + 1e-6
        rows.append(row)
    return rows


def _correctness_case(shape: tuple[int, ...], dtype: torch.dtype) -> list[dict[str, Any]]:
    from memformer_fast import kernels, reference

    B, H, Dh, S, L = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(DEVICE)

    scale, temperature = Dh**-0.5, 0.5
    results = []
    tag = dict(B=B, H=H, Dh=Dh, S=S, L=L, dtype=_name(dtype))

    # memory read
    q, do = randn(B, L, H, Dh), randn(B, L, H, Dh)
    k, v = randn(B, S, H, Dh), randn(B, S, H, Dh)
    fn = lambda q, k, v: reference.memory_read_attention(q, k, v, scale)
    exact = _grads(fn, [q, k, v], do, torch.float32)
    lowp = _grads(fn, [q, k, v], do, dtype)
    q_, k_, v_, do_ = (t.to(dtype) for t in (q, k, v, do))
    with nan_poisoned_empty():
        o, lse = kernels.memory_read_fwd(q_, k_, v_, scale)
        actual = [o, *kernels.memory_read_bwd(do_, q_, k_, v_, lse, scale)]
    for row in _compare(("o", "dq", "dk", "dv"), actual, lowp, exact):
        results.append({"op": "memory_read", **tag, **row})

    # memory write, with a token mask (batch row 0 all padding)
    qs, ks, vs, dos = (randn(B, S, H, Dh) for _ in range(4))
    kt, vt = randn(B, L, H, Dh), randn(B, L, H, Dh)
    mask = (torch.rand(B, L, generator=gen) > 0.2).to(DEVICE)
    mask[0] = False
    fn = lambda *t: reference.memory_write_attention(*t, mask, temperature, scale)
    inputs = [qs, ks, vs, kt, vt]
    exact = _grads(fn, inputs, dos, torch.float32)
    lowp = _grads(fn, inputs, dos, dtype)
    low = [t.to(dtype) for t in inputs]
    with nan_poisoned_empty():
        o, lse = kernels.memory_write_fwd(*low, mask, temperature, scale)
        grads = kernels.memory_write_bwd(dos.to(o.dtype), *low, mask, o, lse, temperature, scale)
    names = ("o", "dq", "dk_self", "dv_self", "dk", "dv")
    for row in _compare(names, [o.to(dtype), *grads], lowp, exact):
        results.append({"op": "memory_write", **tag, **row})

    # gated update over the model width D = H * Dh
    D = H * Dh
    memory, candidate, gate, dout = (randn(B, S, D) for _ in range(4))
    bias = randn(S, D)
    fn = lambda m, c, b, g: reference.gated_memory_update(m, c, b, g, 1e-5)
    inputs = [memory, candidate, bias, gate]
    exact = _grads(fn, inputs, dout, torch.float32)
    lowp = _grads(fn, inputs, dout, dtype)
    low = [t.to(dtype) for t in inputs]
    with nan_poisoned_empty():
        out = kernels.gated_update_fwd(*low, 1e-5)
        grads = kernels.gated_update_bwd(dout.to(dtype), *low, 1e-5)
    names = ("out", "dmemory", "dcandidate", "dbias", "dgate")
    for row in _compare(names, [out, *grads], lowp, exact):
        results.append({"op": "gated_update", **tag, **row})
    return results


def stage_correctness(args: argparse.Namespace) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for shape in DRY_SHAPES if args.dry_run else GPU_SHAPES:
        for dtype in DTYPES:
            rows += _correctness_case(shape, dtype)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    failed = [r for r in rows if not r["passed"]]
    return {"passed": not failed, "checked": len(rows), "failed": failed, "rows": rows}


# ------------------------------------------------------------------------------------------------
# kernels: time against the floor
# ------------------------------------------------------------------------------------------------


def _time_per_call(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call: CUDA events around back-to-back calls, or wall clock on the CPU."""
    if DEVICE.type == "cuda":
        from harness import cuda_time_per_call

        return cuda_time_per_call(fn, calls)
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measured_rates(dry_run: bool) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and bfloat16 matmul rate (FLOP/s) of this device."""
    n = 2**16 if dry_run else 2**28
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = _time_per_call(lambda: dst.copy_(src), 3 if dry_run else 20)
    bandwidth = 2 * src.numel() * 4 / seconds
    m = 128 if dry_run else 8192
    dtype = torch.float32 if dry_run else torch.bfloat16  # bf16 matmul on CPU is not the point
    a, b = torch.randn(m, m, device=DEVICE).to(dtype), torch.randn(m, m, device=DEVICE).to(dtype)
    seconds = _time_per_call(lambda: a @ b, 2 if dry_run else 20)
    return {"copy_bytes_per_s": bandwidth, "matmul_flop_per_s": 2 * m**3 / seconds}


def _kernel_cases(shape: tuple[int, ...], dtype: torch.dtype):
    """(name, make inputs, call, bytes, flops) of each kernel at ``shape``."""
    import torch.nn.functional as F

    from memformer_fast import kernels

    B, H, Dh, S, L = shape
    e, scale = dtype.itemsize, Dh**-0.5
    tokens, slots = B * L * H * Dh, B * S * H * Dh
    logits = B * H * L * S * Dh

    def randn(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*size, device=DEVICE).to(dt)

    def read_inputs():
        q, k, v = randn(B, L, H, Dh), randn(B, S, H, Dh), randn(B, S, H, Dh)
        _, lse = kernels.memory_read_fwd(q, k, v, scale)
        return q, k, v, randn(B, L, H, Dh), lse

    def sdpa(q, k, v, *_):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )

    def sdpa_bwd_inputs():
        q, k, v, do, _ = read_inputs()
        q, k, v = (t.transpose(1, 2).requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return o, do.transpose(1, 2)

    def write_inputs():
        qs, ks, vs = (randn(B, S, H, Dh) for _ in range(3))
        kt, vt = randn(B, L, H, Dh), randn(B, L, H, Dh)
        mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
        o, lse = kernels.memory_write_fwd(qs, ks, vs, kt, vt, mask, 0.5, scale)
        return qs, ks, vs, kt, vt, mask, o, lse, torch.randn_like(o)

    D = H * Dh

    def gated_inputs():
        memory, candidate, gate, dout = (randn(B, S, D) for _ in range(4))
        return memory, candidate, randn(S, D), gate, dout

    read_bytes = (2 * tokens + 2 * slots) * e + B * H * L * 4
    write_bytes = (3 * slots + 2 * tokens) * e + B * L + slots * 4 + B * H * S * 4
    gated_rows = B * S * D * e
    return [
        ("read fwd", read_inputs, lambda q, k, v, do, lse: kernels.memory_read_fwd(q, k, v, scale),
         read_bytes, 4 * logits),
        ("read fwd sdpa", read_inputs, sdpa, read_bytes, 4 * logits),
        ("read bwd", read_inputs,
         lambda q, k, v, do, lse: kernels.memory_read_bwd(do, q, k, v, lse, scale),
         read_bytes + (tokens + 2 * slots) * e, 10 * logits),
        ("read bwd sdpa", sdpa_bwd_inputs, lambda o, do: o.backward(do, retain_graph=True),
         read_bytes + (tokens + 2 * slots) * e, 10 * logits),
        ("write fwd", write_inputs,
         lambda qs, ks, vs, kt, vt, m, o, lse, do: kernels.memory_write_fwd(
             qs, ks, vs, kt, vt, m, 0.5, scale), write_bytes, 4 * logits),
        ("write bwd", write_inputs,
         lambda qs, ks, vs, kt, vt, m, o, lse, do: kernels.memory_write_bwd(
             do, qs, ks, vs, kt, vt, m, o, lse, 0.5, scale),
         write_bytes + slots * 4 + (3 * slots + 2 * tokens) * e, 10 * logits),
        ("gated fwd", gated_inputs,
         lambda m, c, b, g, d: kernels.gated_update_fwd(m, c, b, g, 1e-5), 4 * gated_rows, 0),
        ("gated bwd", gated_inputs,
         lambda m, c, b, g, d: kernels.gated_update_bwd(d, m, c, b, g, 1e-5), 8 * gated_rows, 0),
    ]  # fmt: skip


def stage_kernels(args: argparse.Namespace) -> dict[str, Any]:
    from harness import Rotation

    rates = measured_rates(args.dry_run)
    rows = []
    for shape in DRY_TIMED if args.dry_run else GPU_TIMED:
        for dtype in (torch.bfloat16, torch.float32):
            for name, make, call, nbytes, flops in _kernel_cases(shape, dtype):
                rotation = Rotation(make, nbytes)
                seconds = _time_per_call(
                    lambda call=call, rotation=rotation: call(*rotation()),
                    1 if args.dry_run else 50,
                )
                floor = max(nbytes / rates["copy_bytes_per_s"], flops / rates["matmul_flop_per_s"])
                B, H, Dh, S, L = shape
                rows.append(
                    dict(kernel=name, dtype=_name(dtype), B=B, H=H, Dh=Dh, S=S, L=L,
                         ms=seconds * 1e3, floor_ms=floor * 1e3, fraction_of_floor=floor / seconds,
                         bytes=nbytes, flops=flops)
                )  # fmt: skip
                rotation.sets.clear()  # frees the inputs before the next case
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
    return {"rates": rates, "rows": rows}


# ------------------------------------------------------------------------------------------------
# compiled: the ops inside torch.compile graphs, eager vs compiled vs CUDA graphs
# ------------------------------------------------------------------------------------------------

# (B, H, Dh, S, L) of the paper's step: batch 8, d_model 512 as 8 heads of 64, 32 slots, segments
# of 64 tokens. Every kernel does about a microsecond of work here: the host decides the speed.
GPU_COMPILED = (8, 8, 64, 32, 64)
DRY_COMPILED = (1, 2, 16, 5, 17)


def _chain_inputs(shape: tuple[int, ...]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(float32 leaves of :func:`_chain`, its token mask [B, L], an upstream gradient [B, S, D])."""
    B, H, Dh, S, L = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(DEVICE).requires_grad_()

    leaves = [randn(B, L, H, Dh), randn(B, S, H, Dh), randn(B, S, H, Dh)]  # read: q, k, v
    leaves += [randn(B, S, H, Dh) for _ in range(3)]  # write: q, k_self, v_self
    leaves += [randn(B, S, H * Dh), randn(S, H * Dh), randn(B, S, H * Dh)]  # memory, bias, gate
    mask = (torch.rand(B, L, generator=gen) > 0.2).to(DEVICE)
    return leaves, mask, torch.randn(B, S, H * Dh, generator=gen).to(DEVICE)


def _chain(q, k, v, wq, wks, wvs, memory, bias, gate, mask):  # type: ignore[no-untyped-def]
    """The three ops chained as a model chains them: the tokens read the memory, the slots write
    from what was read, the gated update makes the new memory [B, S, D]."""
    from memformer_fast import ops

    h = ops.memory_read_attention(q, k, v, q.shape[-1] ** -0.5)
    written = ops.memory_write_attention(wq, wks, wvs, h, h, mask, 0.5, q.shape[-1] ** -0.5)
    return ops.gated_memory_update(memory, written.flatten(2), bias, gate, 1e-5)


def _graph_nodes(leaves: list[torch.Tensor], mask: torch.Tensor) -> dict[str, Any]:
    """Kernel launches and ``memformer_fast`` ops left in AOTAutograd's forward and backward
    graphs of :func:`_chain` (on CUDA: launches only; on the CPU: the portable ops)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs: list) -> Callable[..., Any]:
        graphs.append(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    out = torch.compile(_chain, backend=backend, fullgraph=True)(*leaves, mask)
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    return {
        "graphs": len(graphs),
        "kernel_launches": sum("triton_kernel_wrapper" in t for t in targets),
        "opaque_ops": [t for t in targets if t.startswith("memformer_fast.")],
    }


def stage_compiled(args: argparse.Namespace) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    shape = DRY_COMPILED if args.dry_run else GPU_COMPILED
    leaves, mask, grad = _chain_inputs(shape)
    nodes = _graph_nodes(leaves, mask)
    # CUDA graphs need CUDA; a dry run checks the graphs without inductor's code generation.
    modes = {"eager": None, "compiled": "default"}
    if DEVICE.type == "cuda":
        modes["cuda graphs"] = "reduce-overhead"
    backend = "aot_eager" if args.dry_run else "inductor"
    rows, expected = [], None
    for name, mode in modes.items():
        torch._dynamo.reset()
        counters.clear()
        fn: Callable[..., torch.Tensor] = _chain
        if mode is not None:
            options = {"mode": mode} if backend == "inductor" else {}
            fn = torch.compile(_chain, backend=backend, fullgraph=True, dynamic=False, **options)

        def step(fn: Callable[..., torch.Tensor] = fn) -> list[torch.Tensor]:
            if DEVICE.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*leaves, mask)
            return [out, *torch.autograd.grad(out, leaves, grad)]

        start = time.perf_counter()
        for _ in range(3):  # compiles, then records the CUDA graphs
            values = [t.detach().clone() for t in step()]
        compile_s = time.perf_counter() - start
        expected = values if expected is None else expected
        error = max(relative_error(a, e) for a, e in zip(values, expected))
        seconds = _time_per_call(step, 1 if args.dry_run else 200)
        skips = counters["inductor"]["cudagraph_skips"]
        rows.append(
            dict(mode=name, ms_per_step=seconds * 1e3, warmup_s=compile_s,
                 error_vs_eager=error, cudagraph_skips=skips)
        )  # fmt: skip
    B, H, Dh, S, L = shape
    passed = all(r["error_vs_eager"] < 1e-5 and r["cudagraph_skips"] == 0 for r in rows)
    if DEVICE.type == "cuda":  # on the CPU the ops stay opaque (interpreter or reference)
        passed = passed and nodes["kernel_launches"] > 0 and not nodes["opaque_ops"]
    return {"passed": passed, "B": B, "H": H, "Dh": Dh, "S": S, "L": L, "dtype": "float32",
            "backend": backend, "graph": nodes, "rows": rows}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# training: one MRBP step of the paper's model
# ------------------------------------------------------------------------------------------------


def stage_training(args: argparse.Namespace) -> dict[str, Any]:
    from workloads import RolloutCase, build

    size, batch = ("cpu-small", 2) if args.dry_run else ("paper", 16)
    rows = []
    for segments in (2, 3) if args.dry_run else (4, 16):
        for method in ("mrbp", "mrbp-offload"):
            case = RolloutCase(size, method, segments, batch)
            model, step = build(case, DEVICE)
            step()  # warm-up: compiles the kernels, allocates the buffers
            model.zero_grad(set_to_none=True)
            if DEVICE.type == "cuda":
                from harness import cuda_peak_mb

                torch.cuda.synchronize()
                start = time.perf_counter()
                peak = cuda_peak_mb(step, model)
                seconds = time.perf_counter() - start
            else:
                start = time.perf_counter()
                step()
                seconds, peak = time.perf_counter() - start, None
            rows.append(
                dict(size=size, method=method, T=segments, B=batch, tokens=case.tokens,
                     seconds=seconds, tokens_per_s=case.tokens / seconds, peak_mb=peak)
            )  # fmt: skip
            del model, step
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    lines = [
        "# GPU validation",
        "",
        f"- GPU: {env.get('gpu')}, driver {env.get('driver')}",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}",
        f"- date: {env.get('date')}",
        f"- command: `{report['command']}`",
        "",
        "| stage | exit | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {s['stage']} | {s['rc']} | {s['seconds']} |" for s in report["stages"]]
    correctness = report.get("correctness")
    if correctness:
        lines += ["", f"## Correctness: {'passed' if correctness['passed'] else 'FAILED'} "
                  f"({correctness['checked']} tensors)", "",
                  "| op | dtype | B H Dh S L | worst error | worst ratio to the reference |",
                  "|---|---|---|---|---|"]  # fmt: skip
        groups: dict[tuple, list] = {}
        for r in correctness["rows"]:
            key = (r["op"], r["dtype"], f"{r['B']} {r['H']} {r['Dh']} {r['S']} {r['L']}")
            groups.setdefault(key, []).append(r)
        for (op, dtype, shape), rows in groups.items():
            worst = max(r["error"] for r in rows)
            ratio = max((r.get("ratio", 0.0) for r in rows), default=0.0)
            lines.append(f"| {op} | {dtype} | {shape} | {worst:.2e} | {ratio:.2f} |")
    kernels = report.get("kernels")
    if kernels:
        rates = kernels["rates"]
        lines += ["", f"## Kernels (copy {rates['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
                  f"matmul {rates['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s measured)", "",
                  "| kernel | dtype | B H Dh S L | ms | floor ms | fraction of floor |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in kernels["rows"]:
            shape = f"{r['B']} {r['H']} {r['Dh']} {r['S']} {r['L']}"
            lines.append(f"| {r['kernel']} | {r['dtype']} | {shape} | {r['ms']:.3f} | "
                         f"{r['floor_ms']:.3f} | {r['fraction_of_floor']:.2f} |")  # fmt: skip
    compiled = report.get("compiled")
    if compiled:
        graph = compiled["graph"]
        shape = " ".join(str(compiled[k]) for k in ("B", "H", "Dh", "S", "L"))
        lines += ["", f"## The three ops chained, forward and backward, compiled: "
                  f"{'passed' if compiled['passed'] else 'FAILED'}", "",
                  f"B H Dh S L {shape}, {compiled['dtype']}, backend {compiled['backend']}; "
                  f"{graph['kernel_launches']} kernel launches and "
                  f"{len(graph['opaque_ops'])} opaque ops in the graphs", "",
                  "| mode | ms per step | warm-up s | error vs eager | CUDA-graph skips |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in compiled["rows"]:
            lines.append(f"| {r['mode']} | {r['ms_per_step']:.3f} | {r['warmup_s']:.1f} | "
                         f"{r['error_vs_eager']:.1e} | {r['cudagraph_skips']} |")  # fmt: skip
    training = report.get("training")
    if training:
        lines += ["", "## One MRBP training step", "",
                  "| model | method | T | B | seconds | tokens/s | peak MB |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in training["rows"]:
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            lines.append(f"| {r['size']} | {r['method']} | {r['T']} | {r['B']} | "
                         f"{r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {peak} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def stage_report(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    report: dict[str, Any] = {"command": args.command, "dry_run": args.dry_run, "stages": stages}
    for name in ("env", "correctness", "kernels", "compiled", "training"):
        report[name] = _load(out, name)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(_markdown(report))
    return {"written": ["results.json", "results.md"]}


STAGES = {
    "env": stage_env,
    "correctness": stage_correctness,
    "kernels": stage_kernels,
    "compiled": stage_compiled,
    "training": stage_training,
    "report": stage_report,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", required=True, help="the folder every stage writes into")
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    parser.add_argument("--command", default="", help="the command line, for the report")
    args = parser.parse_args(argv)
    if not args.dry_run and DEVICE.type != "cuda" and args.stage not in ("env", "report"):
        parser.error(f"stage {args.stage} needs a CUDA device (or --dry-run)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = STAGES[args.stage](args)
    if args.stage != "report":
        Path(args.out, f"{args.stage}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result)[:2000])
    return 0 if result.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
