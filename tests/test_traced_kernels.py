"""The CUDA path of every op, traced by ``torch.compile`` on a CPU: kernel launches, not opaque ops.

On CUDA tensors each op of :mod:`memformer_fast.ops` is a ``torch.library.triton_op`` whose body
launches its Triton kernels through ``torch.library.wrap_triton``, so AOTAutograd's forward and
backward graphs hold one ``triton_kernel_wrapper_functional`` node per kernel launch (what inductor
turns into direct calls from its generated code, and what CUDA graphs capture) and no
``memformer_fast::*`` op. This test proves it without a GPU, in a subprocess where:

- ``TRITON_INTERPRET`` is unset, so the kernels are the JIT functions the GPU compiles (the test
  session imported interpreted ones);
- Triton's driver is a stand-in naming an sm_90 target (as in ``test_aot_compile.py``), so the
  launchers pick the GPU's tiles and Triton derives its specialisation, and a ``jit_cache_hook``
  skips compiling and launching;
- the ops' device test (``ops._on_cuda``) answers yes for CPU tensors, and the launchers see 132
  SMs (an H100/H200), so the split reductions (two kernels, partial sums) are traced as well. A CPU
  build of torch cannot make fake CUDA tensors that take views, which the launchers need, so the
  tensors are CPU ones: everything else is the path CUDA tensors take.

``torch.compile(fullgraph=True)`` then runs with an AOTAutograd backend that records the forward
and backward graphs and runs them eagerly (the launches skipped: the values are not checked here;
the kernels' numerics are ``test_kernels.py``'s and the GPU validation's).

Inductor does not import a user kernel: it writes the kernel's source and the Triton functions and
constants it uses into its generated code. The second test checks that this copy of every kernel
compiles for sm_90 to the PTX the kernel itself compiles to, with a specialisation the launchers
make (from ``test_aot_compile.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

# Forward and backward kernels of each op, as traced from the shapes below (splits included).
EXPECTED = {
    "memory_read": (
        ["memory_read_fwd_kernel"],
        ["memory_read_bwd_dq_kernel", "memory_read_bwd_dkdv_kernel"],
    ),
    "memory_write": (
        ["memory_write_fwd_kernel", "memory_write_fwd_combine_kernel"],
        ["memory_write_bwd_dq_kernel", "memory_write_bwd_dkdv_kernel"],
    ),
    "gated_update": (["gated_update_fwd_kernel"], ["gated_update_bwd_kernel"]),
}


# The kernels named for each op's compile-cache key.
REGISTERED = {
    "memory_read_fwd": EXPECTED["memory_read"][0],
    "memory_read_bwd": EXPECTED["memory_read"][1],
    "memory_write_fwd": EXPECTED["memory_write"][0],
    "memory_write_bwd": EXPECTED["memory_write"][1],
    "gated_memory_update_fwd": EXPECTED["gated_update"][0],
    "gated_memory_update_bwd": EXPECTED["gated_update"][1],
}


def _simulate_cuda() -> None:
    """From now on in this process, the ops take their CUDA path on CPU tensors, for an sm_90
    device with 132 SMs, and launches are specialised by Triton but neither compiled nor run."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from memformer_fast import ops
    from memformer_fast.kernels import utils

    class TargetDriver:
        """Names an sm_90 target; launches nothing."""

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int) -> int:
            return 0

    driver.set_active(TargetDriver())
    knobs.runtime.jit_cache_hook = lambda **_: True
    ops._on_cuda = lambda t: True  # type: ignore[assignment]
    utils.num_sms = lambda device: 132  # type: ignore[assignment]


def _trace(dynamic: bool) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Compile each op's forward and backward (with all sizes symbolic if ``dynamic``); per op and
    graph ("forward", "backward"), the kernels launched in order, the ``memformer_fast`` ops left
    opaque and the graph inputs copied for a launch."""
    import torch
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.jit import JITFunction

    from memformer_fast import ops

    def kernel_name(node: torch.fx.Node) -> str:
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        while not isinstance(kernel, JITFunction):  # num_warps wraps it in a one-config Autotuner
            kernel = kernel.fn
        return kernel.fn.__name__

    def summary(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        launches = [n for n in nodes if "triton_kernel_wrapper" in str(n.target)]
        return {
            "kernels": [kernel_name(n) for n in launches],
            "opaque": [str(n.target) for n in nodes if str(n.target).startswith("memformer_fast.")],
            # Graph inputs the functional launch copies because the kernel writes them: none when
            # Triton's analysis of the kernel (its TTIR for sm_90) found what each one writes.
            "copied_inputs": [
                name
                for n in launches
                for name in n.kwargs["tensors_to_clone"]
                if getattr(n.kwargs["kwargs"][name], "op", None) == "placeholder"
            ],
        }

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, requires_grad=True)

    mask = torch.rand(2, 300) > 0.3
    cases = {
        # L = 300 tokens: the read's dk/dv and the write's forward and dq split the token axis.
        "memory_read": (
            lambda q, k, v: ops.memory_read_attention(q, k, v, 0.25),
            (leaf(2, 300, 2, 32), leaf(2, 16, 2, 32), leaf(2, 16, 2, 32)),
        ),
        "memory_write": (
            lambda q, ks, vs, k, v: ops.memory_write_attention(q, ks, vs, k, v, mask, 0.5, 0.25),
            (*(leaf(2, 16, 2, 32) for _ in range(3)), leaf(2, 300, 2, 32), leaf(2, 300, 2, 32)),
        ),
        # A batch of 8: the bias gradient is split over the batch.
        "gated_update": (
            lambda m, c, b, g: ops.gated_memory_update(m, c, b, g, 1e-6),
            (leaf(8, 16, 64), leaf(8, 16, 64), leaf(16, 64), leaf(8, 16, 64)),
        ),
    }
    result = {}
    for name, (fn, inputs) in cases.items():
        graphs: list[torch.fx.GraphModule] = []

        def record(gm: torch.fx.GraphModule, _inputs: list, graphs: list = graphs):
            graphs.append(gm)
            return make_boxed_func(gm)

        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=record, bw_compiler=record)
        out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)(*inputs)
        out.backward(torch.randn_like(out))
        assert len(graphs) == 2, f"{name}: {len(graphs)} graphs"
        result[name] = {
            part: summary(gm) for part, gm in zip(("forward", "backward"), graphs, strict=True)
        }
    return result


def _opcheck() -> list[str]:
    """``opcheck``'s schema, autograd-registration and fake-tensor tests of every op (the fake
    implementation is the op's body on fake tensors: same shapes, dtypes and strides as a real
    call); the failures. Its numerical tests need the kernels to run."""
    import torch

    from memformer_fast import ops

    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    q, k, v, do = (torch.randn(2, size, 2, 32) for size in (300, 16, 16, 300))
    mask = torch.rand(2, 300) > 0.3
    m, c, g = (torch.randn(8, 16, 64) for _ in range(3))
    bias = torch.randn(16, 64)
    write = (torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32), q, q)
    o, lse = ops.memory_write_fwd(*write, mask, 0.5, 0.25)
    calls = [
        ("memory_read_fwd", (q, k, v, 0.25)),
        ("memory_read_bwd", (do, q, k, v, 0.25, *ops.memory_read_fwd(q, k, v, 0.25))),
        ("memory_write_fwd", (*write, mask, 0.5, 0.25)),
        ("memory_write_fwd", (*write, None, 0.5, 0.25)),
        ("memory_write_bwd", (o, *write, mask, 0.5, 0.25, o, lse)),
        ("gated_memory_update_fwd", (m, c, bias, g, 1e-6)),
        ("gated_memory_update_bwd", (m, m, c, bias, g, 1e-6, m)),
        ("gated_memory_update_bwd", (m, m, c, bias, None, 1e-6, m)),
    ]
    failures = []
    for name, args in calls:
        op = getattr(torch.ops.memformer_fast, name).default
        try:
            torch.library.opcheck(op, args, test_utils=utils)
        except Exception as error:  # reported by the test
            failures.append(f"{name}: {type(error).__name__}: {error}"[:2000])
    return failures


def _inductor_copies() -> dict[str, bool]:
    """Per kernel: whether inductor's copy of its source compiles for sm_90 to the same PTX (debug
    lines aside) as the kernel, with the launchers' specialisation at float16, head dim 64."""
    import triton
    from test_aot_compile import _specialisations
    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as inductor_source,
    )
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def ptx(kernel, entry: dict) -> list[str]:  # type: ignore[no-untyped-def]
        source = ASTSource(kernel, entry["signature"], entry["constexprs"], entry["attrs"])
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options=entry["options"]
        )
        body = compiled.asm["ptx"].split(".entry", 1)[1].split(".section", 1)[0]
        debug = (".loc", ".file", "$L__", "//")
        return [line for line in body.splitlines() if not line.strip().startswith(debug)]

    result: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _, kernel, entry in _specialisations(90, ["float16 Dh64 aligned", "float16 D512"]):
            name = kernel.__name__
            if name in result:
                continue
            path = os.path.join(tmp, f"{name}.py")
            with open(path, "w") as f:  # what inductor's generated module holds
                f.write("import triton\nimport triton.language as tl\n\n\n@triton.jit\n")
                f.write(inductor_source(kernel) + "\n")
            spec = importlib.util.spec_from_file_location(f"inductor_copy_{name}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            result[name] = ptx(getattr(module, name), entry) == ptx(kernel, entry)
    return result


def _run_here(cache: Path, *args: str) -> dict:
    """This file run as a script with ``args``, without ``TRITON_INTERPRET`` and with caches of
    its own under ``cache`` (``testing_utils.compile_worker_env``): its JSON."""
    from testing_utils import compile_worker_env

    env = compile_worker_env(cache)
    run = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_cuda_path_traces_to_kernel_launches(tmp_path: Path) -> None:
    """Every forward and backward graph launches the op's kernels and holds no opaque op on the
    CUDA path; on the CPU's (the control: what every device got before), only the opaque op."""
    traced = _run_here(tmp_path, "trace")
    for name, kernels in EXPECTED.items():
        for part, launched in zip(("forward", "backward"), kernels, strict=True):
            cpu = traced["cpu"][name][part]
            for shapes in ("cuda", "cuda dynamic"):
                cuda = traced[shapes][name][part]
                expected = {"kernels": launched, "opaque": [], "copied_inputs": []}
                assert cuda == expected, (shapes, name, part, cuda)
            assert cpu["kernels"] == [], (name, part, cpu)
            assert len(cpu["opaque"]) == 1, (name, part, cpu)
            assert cpu["opaque"][0].endswith("_portable.default"), (name, part, cpu)
    for op, kernels in REGISTERED.items():
        assert traced["registry"][f"memformer_fast::{op}"] == kernels, op
    assert traced["opcheck"] == []


@pytest.mark.aot
def test_inductors_copy_of_each_kernel_compiles_to_the_same_ptx(tmp_path: Path) -> None:
    copies = _run_here(tmp_path, "inductor-copies")
    expected = {kernel for forward, backward in EXPECTED.values() for kernel in forward + backward}
    assert copies == dict.fromkeys(expected, True)


if __name__ == "__main__" and sys.argv[1:] == ["inductor-copies"]:
    print(json.dumps(_inductor_copies()))
elif __name__ == "__main__":
    import torch

    cpu = _trace(dynamic=False)
    _simulate_cuda()
    cuda, cuda_dynamic = _trace(dynamic=False), _trace(dynamic=True)
    # What the compile caches hash: the kernels ops._kernels() named for each op.
    registry = {
        op: [k.fn.__name__ for k in torch._library.triton.get_triton_kernels_for_op(op)]
        for op in (f"memformer_fast::{name}" for name in REGISTERED)
    }
    result = {"cpu": cpu, "cuda": cuda, "cuda dynamic": cuda_dynamic, "registry": registry}
    print(json.dumps(result | {"opcheck": _opcheck()}))
