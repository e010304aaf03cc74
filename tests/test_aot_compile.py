"""Ahead-of-time compilation of every shipped kernel configuration for sm_90 and sm_80.

No GPU is needed: ``triton.compile`` lowers each kernel to PTX and the ``ptxas`` bundled with
Triton assembles it, reporting registers and spills. A configuration is every (kernel, dtype,
padded head dim or width) the launchers' heuristics can pick, with the code-changing flags at
their heaviest setting (mask, split, gate: they only add code), plus each lighter flag variant
once. The test fails on a compile error, on register spills, or on shared memory above the
target's limit, and prints a table of registers and shared memory.

Compilation runs in subprocesses (one per target, in parallel) with ``TRITON_INTERPRET`` unset:
under the interpreter ``triton.jit`` yields functions the compiler cannot take.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.aot

# Shared memory per block (opt-in maximum) and the ptxas architecture name of each target.
TARGETS = {90: (227 * 1024, "sm_90a"), 80: (163 * 1024, "sm_80")}
FLOAT_ARGS = ("scale", "logit_scale", "eps")
TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _variants():
    """(label, kernel, pointer types, constexprs, options) of every shipped configuration."""
    import torch
    import triton.language as tl
    from memformer_fast.kernels import gated_update as gu
    from memformer_fast.kernels import memory_read as mr
    from memformer_fast.kernels import memory_write as mw
    from memformer_fast.kernels.utils import kernel_dtype_args

    def split(cfg: dict) -> tuple[dict, dict]:
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        return cfg, options

    f32 = "*fp32"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = "*" + TORCH_TO_TRITON[str(dtype).split(".")[1]]
        dargs = kernel_dtype_args(dtype)
        for Dh in (16, 32, 64, 128):
            tag = f"{str(dtype).split('.')[1]} Dh{Dh}"
            cfg, opt = split(mr.memory_read_config("fwd", dtype, Dh))
            ptrs = dict(q=t, k=t, v=t, o=t, lse=f32)
            yield f"read_fwd {tag}", mr.memory_read_fwd_kernel, ptrs, cfg | dargs, opt
            cfg, opt = split(mr.memory_read_config("bwd_dq", dtype, Dh))
            ptrs = dict(q=t, k=t, v=t, do=t, lse=f32, delta=f32, dq=t)
            yield f"read_bwd_dq {tag}", mr.memory_read_bwd_dq_kernel, ptrs, cfg | dargs, opt
            cfg, opt = split(mr.memory_read_config("bwd_dkdv", dtype, Dh))
            ptrs = dict(q=t, k=t, v=t, do=t, lse=f32, delta=f32, dk=f32, dv=f32)
            yield f"read_bwd_dkdv {tag}", mr.memory_read_bwd_dkdv_kernel, ptrs, cfg | dargs, opt

            flags = dict(HAS_MASK=True)
            cfg, opt = split(mw.memory_write_config("fwd", dtype, Dh))
            ptrs = dict(q=t, k_self=t, v_self=t, k=t, v=t, token_mask="*i1", o=f32, lse=f32)
            ptrs["l_part"] = f32
            fn = mw.memory_write_fwd_kernel
            yield f"write_fwd {tag}", fn, ptrs, cfg | dargs | flags | dict(SPLIT=True), opt
            cfg, opt = split(mw.memory_write_config("bwd_dq", dtype, Dh))
            ptrs = dict(q=t, k_self=t, v_self=t, k=t, v=t, token_mask="*i1", o=f32, do=f32)
            ptrs |= dict(lse=f32, delta=f32, dq=f32, dk_self=t, dv_self=t)
            yield (
                f"write_bwd_dq {tag}",
                mw.memory_write_bwd_dq_kernel,
                ptrs,
                cfg | dargs | flags,
                opt,
            )
            cfg, opt = split(mw.memory_write_config("bwd_dkdv", dtype, Dh))
            ptrs = dict(q=t, k=t, v=t, token_mask="*i1", do=f32, lse=f32, delta=f32, dk=t, dv=t)
            fn = mw.memory_write_bwd_dkdv_kernel
            yield f"write_bwd_dkdv {tag}", fn, ptrs, cfg | dargs | flags, opt

        for D in [2**i for i in range(4, 12)]:
            tag = f"{str(dtype).split('.')[1]} D{D}"
            acc = dict(ACC_DTYPE=tl.float32, HAS_GATE=True)
            cfg, opt = split(gu.gated_update_config("fwd", D))
            ptrs = dict(memory=t, candidate=t, bias=t, gate_logits=t, out=t)
            yield f"gated_fwd {tag}", gu.gated_update_fwd_kernel, ptrs, cfg | acc, opt
            cfg, opt = split(gu.gated_update_config("bwd", D))
            ptrs = dict(dout=t, memory=t, candidate=t, bias=t, gate_logits=t, dmemory=t)
            ptrs |= dict(dcandidate=t, dbias=f32, dgate_logits=t)
            yield f"gated_bwd {tag}", gu.gated_update_bwd_kernel, ptrs, cfg | acc, opt

    for Dh in (16, 32, 64, 128):
        cfg, opt = split(mw.memory_write_config("fwd_combine", torch.float32, Dh))
        ptrs = dict(o_part=f32, m_part=f32, l_part=f32, o=f32, lse=f32)
        yield (
            f"write_combine Dh{Dh}",
            mw.memory_write_fwd_combine_kernel,
            ptrs,
            cfg | dict(ACC_DTYPE=tl.float32),
            opt,
        )

    # The lighter flag variants, once each (bfloat16, Dh 64 / width 512).
    t, dargs = "*bf16", kernel_dtype_args(torch.bfloat16)
    cfg, opt = split(mw.memory_write_config("fwd", torch.bfloat16, 64))
    ptrs = dict(q=t, k_self=t, v_self=t, k=t, v=t, token_mask=None, o=t, lse=f32, l_part=None)
    flags = dict(HAS_MASK=False, SPLIT=False)
    yield (
        "write_fwd bf16 Dh64 no-mask no-split",
        mw.memory_write_fwd_kernel,
        ptrs,
        cfg | dargs | flags,
        opt,
    )
    cfg, opt = split(mw.memory_write_config("bwd_dq", torch.bfloat16, 64))
    ptrs = dict(q=t, k_self=t, v_self=t, k=t, v=t, token_mask=None, o=f32, do=f32)
    ptrs |= dict(lse=f32, delta=f32, dq=t, dk_self=t, dv_self=t)
    yield (
        "write_bwd_dq bf16 Dh64 no-mask",
        mw.memory_write_bwd_dq_kernel,
        ptrs,
        cfg | dargs | dict(HAS_MASK=False),
        opt,
    )
    cfg, opt = split(gu.gated_update_config("bwd", 512))
    ptrs = dict(dout=t, memory=t, candidate=t, bias=t, gate_logits=None, dmemory=None)
    ptrs |= dict(dcandidate=t, dbias=t, dgate_logits=None)
    acc = dict(ACC_DTYPE=tl.float32, HAS_GATE=False)
    yield "gated_bwd bf16 D512 no-gate", gu.gated_update_bwd_kernel, ptrs, cfg | acc, opt


def _compile_all(capability: int, only: list[str]) -> list[dict]:
    """Compile every variant for ``capability`` (or those whose label contains a word of
    ``only``); registers and spills from ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    _, arch = TARGETS[capability]
    ptxas = get_ptxas(capability).path
    rows = []
    for label, fn, ptrs, constexprs, options in _variants():
        if only and not any(word in label for word in only):
            continue
        signature, constants = {}, dict(constexprs)
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name in ptrs:
                signature[p.name] = ptrs[p.name] or "constexpr"
                if ptrs[p.name] is None:
                    constants[p.name] = None
            else:
                signature[p.name] = "fp32" if p.name in FLOAT_ARGS else "i32"
        row = {"label": label, **options}
        try:
            kernel = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constants),
                target=GPUTarget("cuda", capability, 32),
                options=options,
            )
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
            "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": sum(spills),
            "shared": kernel.metadata.shared,
            "wgmma": "wgmma" in kernel.asm["ptx"],
        }
        rows.append(row)
    return rows


def test_aot_compile_all_configurations() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        cap: subprocess.Popen(
            [sys.executable, __file__, str(cap)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cap in TARGETS
    }
    failures = []
    for cap, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1200)
        assert proc.returncode == 0, f"sm_{cap} compile worker failed:\n{stderr[-4000:]}"
        rows = json.loads(stdout)
        limit, _ = TARGETS[cap]
        print(f"\nsm_{cap}: {len(rows)} kernel configurations (shared memory limit {limit} B)")
        columns = ("kernel configuration", "warps", "stages", "regs", "spill", "shared B", "wgmma")
        print("{:46} {:>5} {:>6} {:>5} {:>5} {:>9} {:>5}".format(*columns))
        for r in rows:
            if "error" in r:
                failures.append(f"sm_{cap} {r['label']}: {r['error']}")
                print(f"{r['label']:46} ERROR {r['error'][:60]}")
                continue
            values = (r["label"], r.get("num_warps", 4), r.get("num_stages", "-"), r["registers"])
            values += (r["spill_bytes"], r["shared"], str(r["wgmma"]))
            print("{:46} {:>5} {:>6} {:>5} {:>5} {:>9} {:>5}".format(*values))
            if r["spill_bytes"]:
                failures.append(f"sm_{cap} {r['label']}: {r['spill_bytes']} bytes of spills")
            if r["shared"] > limit:
                failures.append(f"sm_{cap} {r['label']}: {r['shared']} B shared > {limit} B")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    # python tests/test_aot_compile.py 90 [label words...]: one target, optionally a subset.
    print(json.dumps(_compile_all(int(sys.argv[1]), sys.argv[2:])))
