"""Eager vs compiled MRBP steps on the CPU, in the same run.

``mrbp.backward(model, ids, compile=True)`` runs each segment's step through
``torch.compile(fullgraph=True)`` (inductor). At the paper's layer structure (encoder-decoder,
4 encoder + 8 decoder layers, 32 slots, dropout 0.1, a padded attention mask) two settings:

- launch-bound: batch 1, segments of 16, width 64, T = 4: each operator does little work, as
  every kernel does on a GPU at the paper's sizes, so the host's dispatch decides the time;
- compute-bound: batch 8, segments of 64, width 64, T = 4.

Per setting: the first compiled call (compilation included), then ``--repeats`` timed calls of
each, eager and compiled alternating (so a drift of the shared machine hits both), median and
spread; the gradients of both are compared. ``python benchmarks/bench_compile.py --out
benchmarks/results/compile`` writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memformer_fast import Memformer, MemformerConfig, mrbp

SETTINGS = {
    "launch-bound": {"batch_size": 1, "segment_length": 16},
    "compute-bound": {"batch_size": 8, "segment_length": 64},
}


def make_model(segment_length: int, d_model: int) -> Memformer:
    torch.manual_seed(0)
    config = MemformerConfig(
        vocab_size=256, d_model=d_model, n_heads=8, d_ff=4 * d_model, n_encoder_layers=4,
        n_decoder_layers=8, n_memory_slots=32, segment_length=segment_length, dropout=0.1,
        architecture="encoder-decoder", backend="reference",
    )  # fmt: skip
    return Memformer(config).train()


def inputs(batch_size: int, segment_length: int, segments: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    n = segments * segment_length
    ids = torch.randint(0, 256, (batch_size, n), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, n - segment_length // 2 :] = 0  # padding: the mask is really used
    return ids, mask


def step(model: Memformer, ids: torch.Tensor, mask: torch.Tensor, compile: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    mrbp.backward(model, ids, attention_mask=mask, compile=compile)
    return time.perf_counter() - start


def measure(name: str, d_model: int, segments: int, repeats: int) -> dict[str, Any]:
    shape = SETTINGS[name]
    model = make_model(shape["segment_length"], d_model)
    ids, mask = inputs(shape["batch_size"], shape["segment_length"], segments)
    torch.manual_seed(2)
    step(model, ids, mask, False)
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(2)
    first_compiled = step(model, ids, mask, True)
    worst = max(
        float((p.grad - eager_grads[n]).norm() / eager_grads[n].norm().clamp_min(1e-30))
        for n, p in model.named_parameters()
        if n in eager_grads
    )
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        times["eager"].append(step(model, ids, mask, False))
        times["compiled"].append(step(model, ids, mask, True))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "setting": name,
        **shape,
        "d_model": d_model,
        "segments": segments,
        "repeats": repeats,
        "first_compiled_call_s": first_compiled,
        "median_ms": {k: 1e3 * v for k, v in medians.items()},
        "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
        "max_ms": {k: 1e3 * max(v) for k, v in times.items()},
        "speedup": medians["eager"] / medians["compiled"],
        "worst_relative_grad_difference": worst,
    }


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
    }


def markdown(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Eager vs compiled MRBP steps on the CPU",
        "",
        f"`{info['command']}` ({info['date']}, torch {info['torch']}, Python {info['python']}, "
        f"{info['platform']}, {info['cpu_count']} CPUs shared with other jobs, "
        f"{info['torch_threads']} torch thread(s)). Encoder-decoder, 4 encoder + 8 decoder "
        "layers, 32 slots, dropout 0.1, a padded attention mask, reference backend; one "
        "`mrbp.backward` call per sample, eager and `compile=True` (inductor) alternating.",
        "",
        "| setting | batch | segment | width | T | eager ms (median) | compiled ms (median) "
        "| speed-up | first compiled call s | grad rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['batch_size']} | {r['segment_length']} | {r['d_model']} "
            f"| {r['segments']} | {r['median_ms']['eager']:.1f} | {r['median_ms']['compiled']:.1f} "
            f"| {r['speedup']:.2f}x | {r['first_compiled_call_s']:.0f} "
            f"| {r['worst_relative_grad_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.settings:
        rows.append(measure(name, args.d_model, args.segments, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    info = machine()
    text = markdown(info, rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
