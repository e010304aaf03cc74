"""How many ATen operators and device-to-host syncs one ``mrbp.backward`` dispatches.

On a GPU at the paper's sizes every kernel does about a microsecond of work, so the host's cost per
dispatched operator and every wait for the device decide the speed of a training step. Both are
counted here with a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, which sees every
operator below autograd (forward, backward, and the replay buffer's C++ calls alike). The counts
depend on the model's structure, never on its width or on timing, so they are exact and can be
tested (``tests/test_op_counts.py``).

``python benchmarks/op_counts.py`` prints the per-operator table and the per-segment slope (the
count at T = 8 minus the count at T = 4, over 4) at the paper's layer structure: encoder-decoder,
4 encoder + 8 decoder layers, 32 slots, segments of 64, dropout 0.1, batch 8, an attention mask
with padding, reference backend, CPU, a warm model (one call before counting). The width is 64:
the counts do not depend on it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memformer_fast import Memformer, MemformerConfig, mrbp

aten = torch.ops.aten

# Operators that make the host wait for the device: they return a value the host reads (a Python
# number, or an output whose size depends on the data).
SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense.default,  # .item(), int(t), bool(t), float(t)
        aten.is_nonzero.default,
        aten.item.default,
        aten.nonzero.default,
        aten.nonzero_static.default,
        aten.masked_select.default,
        aten.equal.default,
        aten.allclose.default,
        aten.unique_dim.default,
        aten._unique2.default,
        aten.unique_consecutive.default,
        aten.repeat_interleave.Tensor,
    }
)


def is_view(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` returns an alias of an input (metadata only, nothing dispatched to a
    device): ``view``, ``transpose``, ``select``, ``expand``, ``split``... per its schema."""
    return bool(func.is_view) or func in (aten._unsafe_view.default, aten.alias.default)


class OpCounter(TorchDispatchMode):
    """Counts every non-view ATen operator dispatched in its body, by name (``aten.mm``), and the
    device-to-host syncs among them (:data:`SYNC_OPS`, plus copies from a device to the CPU).

    ``Tensor.tolist()`` and ``Tensor.numpy()`` of a CPU tensor read its memory without dispatching
    anything (on a device they dispatch a copy to the CPU, counted as such): they are counted as
    syncs under their own names, since the same code on a GPU would wait there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> OpCounter:
        for name in ("tolist", "numpy"):
            original = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._host_read(name, original))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _host_read(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.device.type == "cpu":  # a sync, though no ATen operator
                self.syncs[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)

        return read

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if is_view(func):
            return out
        name = f"aten.{func.overloadpacket.__name__}"
        self.ops[name] += 1
        if func in SYNC_OPS or _device_to_host(func, args, kwargs or {}, out):
            self.syncs[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _device_to_host(
    func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> bool:
    """A copy from an accelerator into CPU memory (``.cpu()``, ``.tolist()`` on CUDA...)."""
    if func not in (aten._to_copy.default, aten.copy_.default):
        return False
    src = args[1] if func is aten.copy_.default else args[0]
    dst = args[0] if func is aten.copy_.default else out
    return (
        isinstance(src, torch.Tensor)
        and isinstance(dst, torch.Tensor)
        and src.device.type != "cpu"
        and dst.device.type == "cpu"
    )


@dataclass
class Workload:
    """A model and a rollout for ``mrbp.backward`` (the defaults: the paper's layer structure)."""

    d_model: int = 64
    n_heads: int = 8
    d_ff: int = 256
    n_encoder_layers: int = 4
    n_decoder_layers: int = 8
    n_memory_slots: int = 32
    segment_length: int = 64
    dropout: float = 0.1
    batch_size: int = 8
    vocab_size: int = 256
    architecture: str = "encoder-decoder"
    backend: str = "reference"
    offload: bool = False
    model: Memformer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = Memformer(
            MemformerConfig(
                vocab_size=self.vocab_size,
                d_model=self.d_model,
                n_heads=self.n_heads,
                d_ff=self.d_ff,
                n_encoder_layers=self.n_encoder_layers,
                n_decoder_layers=self.n_decoder_layers,
                n_memory_slots=self.n_memory_slots,
                segment_length=self.segment_length,
                dropout=self.dropout,
                architecture=self.architecture,
                backend=self.backend,
            )
        ).train()

    def inputs(self, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[B, T*L]``: the last row's last segment is half
        padding, so the mask is really used (an all-ones mask is dropped as None)."""
        g = torch.Generator().manual_seed(num_segments)
        n = num_segments * self.segment_length
        ids = torch.randint(0, self.vocab_size, (self.batch_size, n), generator=g)
        mask = torch.ones(self.batch_size, n, dtype=torch.long)
        mask[-1, n - self.segment_length // 2 :] = 0
        return ids, mask

    def step(self, num_segments: int) -> Callable[[], None]:
        ids, mask = self.inputs(num_segments)

        def run() -> None:
            mrbp.backward(self.model, ids, attention_mask=mask, offload=self.offload)

        return run


def count(fn: Callable[[], None], warm: bool = True) -> OpCounter:
    """Operators and syncs of one call of ``fn`` (after one uncounted call when ``warm``)."""
    if warm:
        fn()
    with OpCounter() as counter:
        fn()
    return counter


@dataclass
class Slope:
    """Counts at two rollout lengths and the per-segment difference, overall and per operator."""

    short: int
    long: int
    at_short: OpCounter
    at_long: OpCounter

    def per_segment(self) -> float:
        return (self.at_long.total - self.at_short.total) / (self.long - self.short)

    def per_op(self) -> dict[str, float]:
        names = self.at_long.ops.keys() | self.at_short.ops.keys()
        span = self.long - self.short
        rows = {n: (self.at_long.ops[n] - self.at_short.ops[n]) / span for n in names}
        return dict(sorted(rows.items(), key=lambda kv: (-kv[1], kv[0])))


def measure(workload: Workload, short: int = 4, long: int = 8) -> Slope:
    return Slope(short, long, count(workload.step(short)), count(workload.step(long)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="encoder-decoder")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workload = Workload(
        d_model=args.d_model,
        dropout=args.dropout,
        architecture=args.architecture,
        offload=args.offload,
    )
    slope = measure(workload)
    print(f"{workload!r}")
    print(f"operators per segment (T={slope.short} -> T={slope.long}): {slope.per_segment():g}")
    at_32 = count(workload.step(32))
    for t, c in ((slope.short, slope.at_short), (slope.long, slope.at_long), (32, at_32)):
        print(f"  T={t}: {c.total} operators, {c.total_syncs} syncs {dict(c.syncs)}")
    print(f"\n{'operator':<40} {'per segment':>12} {'T=' + str(slope.long):>8}")
    for name, per in slope.per_op().items():
        if per or slope.at_long.ops[name]:
            print(f"{name:<40} {per:>12g} {slope.at_long.ops[name]:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "workload": repr(workload),
                    "per_segment": slope.per_segment(),
                    "per_op": slope.per_op(),
                    "totals": {slope.short: slope.at_short.total, slope.long: slope.at_long.total},
                    "syncs": {
                        slope.short: slope.at_short.syncs,
                        slope.long: slope.at_long.syncs,
                        32: at_32.syncs,
                    },
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
