"""Ahead-of-time compilation of the kernels the GPU will run, for sm_90 and sm_80, on a CPU.

Each kernel is compiled with the signature and specialisation the JIT itself derives at launch:
the real launchers (``memory_read_fwd``, ``memory_write_bwd``, ...) are called on CPU tensors laid
out as the model lays them out (projections viewed as heads, keys and values as chunks of one
projection), with Triton's driver replaced by a stand-in that names the GPU target. Triton's own
launch path then binds the arguments and specialises them (pointers and integers divisible by 16,
integers equal to 1, the constexprs of each configuration), and its ``jit_cache_hook`` hands over
the signature, constants, attributes and options instead of compiling and launching. These are
compiled with ``triton.compile`` as the JIT would, and the ``ptxas`` bundled with Triton reports
registers and spills.

Shapes: the realistic ones (H 8, S 64, L 512: every stride and length divisible by 16) and odd
ones (H 3, S 33, L 500, head dims below the tile: no divisibility), float32, float16 and
bfloat16, head dims 16 to 128 (widths 16 to 2048 for the gated update), with and without a token
mask, one and several splits (float32 partials). The test fails on a compile error, on shared
memory above the target's limit, or on any register spill (``STRICT_SPILLS``: both targets; the
launchers take sm_80's own tiles where sm_90's spill there), and prints a table.

Compilation runs in subprocesses (one per target, in parallel) with ``TRITON_INTERPRET`` unset:
under the interpreter ``triton.jit`` yields functions the compiler cannot take. Each worker has
caches of its own under the test's ``tmp_path`` and no ``TRITON_*`` variable of the caller's
(``testing_utils.compile_worker_env``): whatever ran before or beside it (the rest of the suite,
another run sharing ``~/.triton/cache``), it compiles the same kernels from scratch. ``make
check-aot-triton-latest`` runs this test under the newest Triton too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.aot

# Shared memory per block (opt-in maximum) and the ptxas architecture name of each target.
TARGETS = {90: (227 * 1024, "sm_90a"), 80: (163 * 1024, "sm_80")}
# Targets whose spills fail the test.
STRICT_SPILLS = {80, 90}
HEAD_DIMS = (16, 32, 64, 128)
# (heads, slots, tokens, head dim for each padded head dim): the model's shapes, then odd ones.
SHAPES = {
    "aligned": (8, 64, 512, {d: d for d in HEAD_DIMS}),
    "odd": (3, 33, 500, {16: 12, 32: 24, 64: 40, 128: 72}),
}
WIDTHS = [2**i for i in range(4, 12)]


def _launches() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) pairs: each call runs real launchers on CPU tensors laid out as in the model.

    Every dtype, shape set and head dim runs with the code-heaviest flags (token mask, several
    splits with float32 partials); the lighter variants (no mask, one split: other pointer dtypes
    and less code) run once per dtype at head dim 64 (width 512 for the gated update).
    """
    import torch

    from memformer_fast.kernels import gated_update as gu
    from memformer_fast.kernels import memory_read as mr
    from memformer_fast.kernels import memory_write as mw

    B = 2

    def heads(rows: int, H: int, Dh: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, rows, H, Dh] viewed from a [B, rows, H * Dh] projection."""
        return torch.randn(B, rows, H * Dh).to(dtype).view(B, rows, H, Dh)

    def kv(rows: int, H: int, Dh: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the two halves of one [B, rows, 2 * H * Dh] projection."""
        k, v = torch.randn(B, rows, 2 * H * Dh).to(dtype).chunk(2, -1)
        return k.view(B, rows, H, Dh), v.view(B, rows, H, Dh)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape, (H, S, L, head_dims) in SHAPES.items():
            for block_d, Dh in head_dims.items():
                tag = f"{name} Dh{block_d} {shape}"
                light = shape == "aligned" and block_d == 64
                q = heads(L, H, Dh, dtype)
                k, v = kv(S, H, Dh, dtype)
                qs, ks, vs = (heads(S, H, Dh, dtype) for _ in range(3))
                kt, vt = kv(L, H, Dh, dtype)
                mask = torch.rand(B, L) > 0.3

                def read(q=q, k=k, v=v, scale=Dh**-0.5, light=light) -> None:
                    o, lse = mr.memory_read_fwd(q, k, v, scale)
                    for splits in (3, 1) if light else (3,):
                        mr.memory_read_bwd(torch.randn_like(o), q, k, v, lse, scale, splits)

                def write(args=(qs, ks, vs, kt, vt), mask=mask, scale=Dh**-0.5, light=light):
                    for token_mask, splits in [(mask, 3), (None, 1)] if light else [(mask, 3)]:
                        o, lse = mw.memory_write_fwd(*args, token_mask, 0.5, scale, splits)
                        do = torch.randn_like(o)
                        mw.memory_write_bwd(do, *args, token_mask, o, lse, 0.5, scale, splits)

                yield f"read {tag}", read
                yield f"write {tag}", write

        for D in WIDTHS:

            def gated(D=D, dtype=dtype, S=32) -> None:
                memory, candidate, gate, dout = (torch.randn(B, S, D).to(dtype) for _ in range(4))
                bias = torch.randn(S, D).to(dtype)
                for gate_logits, splits in [(gate, 2), (None, 1)] if D == 512 else [(gate, 2)]:
                    gu.gated_update_fwd(memory, candidate, bias, gate_logits, 1e-5)
                    gu.gated_update_bwd(dout, memory, candidate, bias, gate_logits, 1e-5, splits)

            yield f"gated {name} D{D}", gated


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target, launches nothing."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


def _specialisations(capability: int, only: list[str]) -> list[tuple[str, object, dict]]:
    """(label, kernel, compile arguments) of every distinct launch the launchers make, as the JIT
    derives them for ``capability`` (or those whose label contains a word of ``only``)."""
    from triton import knobs
    from triton.runtime import driver

    found: dict[tuple[str, str], tuple[str, object, dict]] = {}
    label = ""

    def hook(*, key, fn, compile, **_) -> bool:
        data = json.loads(compile["specialization_data"])
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
        entry = dict(
            signature=compile["signature"],
            constexprs=compile["constants"],
            attrs=compile["configs"][0],
            options=options,
        )
        found.setdefault((fn.name, str(key)), (f"{fn.name} {label}", fn.jit_function, entry))
        return True  # compiled below, never launched

    # For good: this runs in a worker process of its own, which launches nothing.
    driver.set_active(_TargetDriver(capability))
    knobs.runtime.jit_cache_hook = hook
    for label, call in _launches():
        if not only or any(word in label for word in only):
            call()
    return list(found.values())


def _compile_all(capability: int, only: list[str]) -> list[dict]:
    """Compile every specialisation for ``capability``; registers and spills from ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    _, arch = TARGETS[capability]
    ptxas = get_ptxas(capability).path
    target = GPUTarget("cuda", capability, 32)
    rows = []
    for label, fn, entry in _specialisations(capability, only):
        options = entry["options"]
        row = {"label": label, "num_warps": options["num_warps"]}
        row["num_stages"] = options["num_stages"]
        try:
            src = ASTSource(fn, entry["signature"], entry["constexprs"], entry["attrs"])
            kernel = triton.compile(src, target=target, options=options)
        except Exception as error:  # reported, and failed, by the test
            rows.append(row | {"error": f"{type(error).__name__}: {error}"[:500]})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            out = subprocess.run(
                [ptxas, "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "kernel.o")],
                capture_output=True,
                text=True,
                check=True,
            )
        log = out.stdout + out.stderr
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        row |= {
            "registers": int(re.search(r"Used (\d+) registers", log).group(1)),  # type: ignore[union-attr]
            "spill_bytes": sum(spills),
            "shared": kernel.metadata.shared,
            "wgmma": "wgmma" in kernel.asm["ptx"],
        }
        rows.append(row)
    return rows


def test_aot_compile_jit_specialisations(tmp_path: Path) -> None:
    triton = pytest.importorskip("triton")
    from testing_utils import compile_worker_env

    procs = {
        cap: subprocess.Popen(
            [sys.executable, __file__, str(cap)],
            env=compile_worker_env(tmp_path / f"sm_{cap}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cap in TARGETS
    }
    failures = []
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=3000)
        status = proc.returncode
        assert status == 0, f"sm_{cap} compile worker exited {status}:\n{stderr[-4000:]}"
        rows = json.loads(stdout.strip().splitlines()[-1])  # its last line: what else it printed
        limit, _ = TARGETS[cap]
        print(f"\ntriton {triton.__version__}, sm_{cap}: {len(rows)} specialisations "
              f"(shared memory limit {limit} B)")  # fmt: skip
        columns = ("kernel, dtype, tile, shapes", "warps", "stages", "regs", "spill", "shared B")
        print("{:44} {:>5} {:>6} {:>5} {:>5} {:>9} wgmma".format(*columns))
        for r in rows:
            if "error" in r:
                failures.append(f"sm_{cap} {r['label']}: {r['error']}")
                print(f"{r['label']:44} ERROR {r['error'][:60]}")
                continue
            values = (r["label"], r["num_warps"], r["num_stages"], r["registers"])
            values += (r["spill_bytes"], r["shared"], r["wgmma"])
            print("{:44} {:>5} {:>6} {:>5} {:>5} {:>9} {}".format(*values))
            if r["spill_bytes"] and cap in STRICT_SPILLS:
                failures.append(f"sm_{cap} {r['label']}: {r['spill_bytes']} bytes of spills")
            if r["shared"] > limit:
                failures.append(f"sm_{cap} {r['label']}: {r['shared']} B shared > {limit} B")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    # python tests/test_aot_compile.py 90 [label words...]: one target, optionally a subset.
    print(json.dumps(_compile_all(int(sys.argv[1]), sys.argv[2:])))
