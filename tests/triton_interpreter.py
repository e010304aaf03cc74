"""Test-only patches of Triton's interpreter (``TRITON_INTERPRET=1``), so that the kernels can be
checked on a CPU as a GPU would run them.

The shipped package never patches Triton: ``tests/conftest.py`` installs these for the test suite
when the interpreter is on, and ``benchmarks/gpu_validate.py --dry-run`` for its CPU rehearsal.
Both patches were written against the interpreter of triton 3.6 and check, before applying, that
the behaviour they replace is there (or that they are not applied yet).
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl


def _patch_scalar_index() -> None:
    """Let interpreted loops use runtime bounds (``range(0, S, BLOCK_S)``) with numpy >= 2.4.

    The interpreter of triton 3.6 stores a scalar argument as a 1-element array and converts it with
    ``int(array)``, which numpy 2.4 turned into a ``TypeError``. Converting through ``.item()`` is
    what it meant. Applied only where numpy rejects the old conversion, so newer Triton releases
    are left alone.
    """
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "_memformer_fast_patched", False):
        return

    def patched(tensor, scope) -> None:  # type: ignore[no-untyped-def]
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._memformer_fast_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 (the interpreter's representation) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even as the GPU's ``cvt.rn`` does."""
    rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def _patch_bfloat16() -> None:
    """Make the interpreter's bfloat16 arithmetic what the GPU computes.

    The interpreter stores bfloat16 as uint16 bit patterns, so its ``tl.dot`` multiplies those
    integers (garbage), and it truncates float32 -> bfloat16 where the GPU rounds to nearest even
    (twice the rounding error). Here a dot with a bfloat16 operand multiplies the exact float32
    values of its bfloat16 inputs with float32 accumulation (what the tensor cores do), and the
    float32 -> bfloat16 cast rounds to nearest even.
    """
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_memformer_fast_patched", False):
        return
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        a32, b32 = (
            _bf16_to_f32(t.data) if t.dtype.scalar == tl.bfloat16 else t.data.astype(np.float32)
            for t in (a, b)
        )
        acc = np.matmul(a32, b32, dtype=np.float32).astype(d.data.dtype) + d.data
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    def patched_cast(self, src, dst_type):  # type: ignore[no-untyped-def]
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_f32_to_bf16(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    patched_dot._memformer_fast_patched = True  # type: ignore[attr-defined]
    builder.create_dot = patched_dot
    builder.cast_impl = patched_cast


def install() -> None:
    """Apply both patches (idempotent). Call it with ``TRITON_INTERPRET=1`` set."""
    _patch_scalar_index()
    _patch_bfloat16()
