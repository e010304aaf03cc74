"""Host overhead of an MRBP step, counted: ATen operators per segment and syncs per rollout.

On a GPU at the paper's sizes every kernel does about a microsecond of work, so what the host
dispatches decides the speed of a step. The counts come from ``benchmarks/op_counts.py``
(a ``TorchDispatchMode``) at the paper's structure (4 encoder + 8 decoder layers, 32 slots, segments
of 64, batch 8, dropout 0.1, a padded attention mask, reference backend) with a tiny width: they do
not depend on the width, nor on timing, so they are exact. A change that dispatches more fails
here; one that dispatches less updates the numbers (and quotes them in its note).

``python benchmarks/op_counts.py`` prints the table per operator.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_op_counts() -> ModuleType:
    spec = importlib.util.spec_from_file_location("op_counts", ROOT / "benchmarks" / "op_counts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


op_counts = _load_op_counts()

# (operators per segment, operators at T = 4, at T = 8, syncs at T = 4, at T = 8, at T = 32).
# Two syncs per rollout, whatever T: the plan's one read, and the finiteness flags' one read after
# the replay. A causal layer given a mask intersects it with the causal one (ones, tril, and: 3
# operators once per segment and pass), M_0 is built from the memory bias once per rollout, and
# the critical-path pass skips the last norm (only the decoder reads it).
EXPECTED = {
    "encoder-decoder": (1194, 3951, 8727, 2, 2, 2),
    "decoder": (1136, 4665, 9209, 2, 2, 2),
}
MAX_SYNCS = 2


@pytest.mark.parametrize("architecture", sorted(EXPECTED))
def test_operators_per_segment_and_syncs_per_rollout(architecture, one_thread):
    workload = op_counts.Workload(d_model=16, n_heads=2, d_ff=32, architecture=architecture)
    slope = op_counts.measure(workload, short=4, long=8)
    counted = (
        slope.per_segment(),
        slope.at_short.total,
        slope.at_long.total,
        slope.at_short.total_syncs,
        slope.at_long.total_syncs,
        op_counts.count(workload.step(32), warm=False).total_syncs,
    )
    table = "\n".join(f"  {name}: {per:g}" for name, per in slope.per_op().items() if per)
    assert max(counted[3:]) <= MAX_SYNCS, f"{architecture}: syncs at T = 4, 8, 32: {counted[3:]}"
    assert counted == EXPECTED[architecture], (
        f"{architecture}: (per segment, at T=4, at T=8, syncs at T=4, 8, 32) = {counted}, "
        f"expected {EXPECTED[architecture]}; syncs at T=8: {dict(slope.at_long.syncs)}; "
        f"per segment:\n{table}"
    )


def test_the_counter_counts_operators_not_views_and_every_host_read():
    x = torch.randn(4, 6, requires_grad=True)
    with op_counts.OpCounter() as counter:
        y = (x.t() @ x).view(-1).unsqueeze(0)  # t, view, unsqueeze: views
        y.sum().backward()
        flags = torch.isfinite(y).all()
        bool(flags), int(y.argmax()), flags.nonzero(), y[0, :2].tolist()
    assert counter.ops == {
        "aten.mm": 3,  # forward, and the gradient through each operand
        "aten.sum": 1,
        "aten.ones_like": 1,  # the seed gradient (its expand is a view)
        "aten.add": 1,  # the two gradients of x
        **{"aten.abs": 1, "aten.ne": 1, "aten.eq": 1, "aten.mul": 1},  # isfinite, decomposed
        "aten.all": 1,
        "aten.argmax": 1,
        "aten._local_scalar_dense": 2,
        "aten.nonzero": 1,
    }
    assert counter.syncs == {
        "aten._local_scalar_dense": 2,
        "aten.nonzero": 1,
        "Tensor.tolist": 1,
    }
    assert "TensorBase" in repr(torch.Tensor.tolist)  # restored on exit
