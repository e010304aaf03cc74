"""``memformer-fast demo``: train a small decoder Memformer on the recall task
(:mod:`memformer_fast.app.recall`) with :func:`memformer_fast.mrbp.backward` along a curriculum,
compare it on held-out sequences with the same model with its memory reset, measure the throughput
and the peak memory of one MRBP step against one full-BPTT step
(:mod:`memformer_fast.app.memory_probe`), and plot the learning curves
(:mod:`memformer_fast.app.plotting`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import mrbp
from ..backends import resolve_backend
from ..clipping import SpikeClip
from ..config import MemformerConfig
from ..model import Memformer
from ..presets import preset
from .memory_probe import measure_peak_memory
from .plotting import plot_curves
from .recall import RecallTask, Stage, curriculum, recall_accuracy, recall_by_length

# The demo's models (memformer_fast.presets): "small", the default, 16 segments in about two
# minutes on 2 CPU cores; "large", 32 segments of 32 tokens, minutes on a GPU, long on a CPU.
SIZES: dict[str, dict[str, int]] = {
    "small": preset("recall-small"),
    "large": preset("recall-large"),
}
DEFAULT_SEGMENTS = {"small": 16, "large": 32}


@dataclass
class DemoOptions:
    """Settings of :func:`run_demo` (the CLI's ``demo`` flags)."""

    size: str = "small"
    segments: int | None = None  # default: DEFAULT_SEGMENTS[size]
    batch_size: int = 32
    steps_per_stage: int = 100
    key_copies: int = 1
    lr: float = 3e-3
    eval_sequences: int = 512
    eval_every: int = 40
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    measure_memory: bool = True
    out_dir: str | None = "runs/demo"
    # Recall far beyond the trained length, streamed at constant memory (recall_by_length).
    reach_lengths: tuple[int, ...] = (16, 256, 4096)
    reach_sequences: int = 128

    @property
    def num_segments(self) -> int:
        return self.segments if self.segments is not None else DEFAULT_SEGMENTS[self.size]


@dataclass
class DemoReport:
    """What the demo measured; :meth:`table` formats it."""

    options: DemoOptions
    num_parameters: int
    accuracy: float
    reset_accuracy: float
    chance: float
    train_tokens_per_s: float
    eval_tokens_per_s: float
    train_seconds: float
    memory_mb: dict[str, float]  # "mrbp@T" / "bptt@T" -> MiB
    memory_what: str
    backend: str
    device: str
    curve: dict[str, list[float]] = field(default_factory=dict)
    plot_path: str | None = None
    reach: dict[int, float] = field(default_factory=dict)  # segments -> recall
    reach_seconds: float = 0.0

    def table(self, extra: list[tuple[str, str]] | None = None) -> str:
        o = self.options
        T, L, B = o.num_segments, SIZES[o.size]["segment_length"], o.batch_size
        rows = [
            ("task", f"recall a key from segment 1 of {T} ({T * L} tokens, {L} per segment)"),
            ("model", f"{o.size}: {self.num_parameters / 1e6:.2f}M parameters, decoder"),
            ("accuracy, with memory", f"{self.accuracy:6.1%}"),
            ("accuracy, memory reset", f"{self.reset_accuracy:6.1%}"),
            ("chance level", f"{self.chance:6.1%}"),
            ("held-out sequences", f"{o.eval_sequences}"),
        ]
        rows += [
            (
                f"recall after {t:,} segments",
                f"{acc:6.1%}   (memory reset {self.reset_accuracy:.1%})",
            )
            for t, acc in self.reach.items()
        ]
        if self.reach:
            rows.append(
                ("  measured as", f"{o.reach_sequences} sequences streamed at constant memory, "
                 f"{self.reach_seconds:.0f} s")
            )  # fmt: skip
        rows += [
            ("train throughput (MRBP)", f"{self.train_tokens_per_s:,.0f} tokens/s"),
            ("eval throughput", f"{self.eval_tokens_per_s:,.0f} tokens/s"),
            ("train time", f"{self.train_seconds:.0f} s"),
        ]
        if self.memory_mb:
            for t in sorted({int(k.split("@")[1]) for k in self.memory_mb}):
                mrbp_mb, bptt_mb = self.memory_mb[f"mrbp@{t}"], self.memory_mb[f"bptt@{t}"]
                rows.append(
                    (
                        f"peak memory at T={t}" + (" (this run)" if t == T else ""),
                        f"MRBP {mrbp_mb:6.1f} MiB   BPTT {bptt_mb:6.1f} MiB   "
                        f"({bptt_mb / max(mrbp_mb, 1e-9):.1f}x)",
                    )
                )
            rows.append(("  measured as", f"{self.memory_what}, B={B}"))
        rows += [("backend, device", f"{self.backend}, {self.device}")]
        if self.plot_path:
            rows.append(("learning curves", self.plot_path))
        rows += extra or []
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def build_model(options: DemoOptions, task: RecallTask) -> Memformer:
    dims: dict[str, Any] = dict(SIZES[options.size])
    cfg = MemformerConfig(
        vocab_size=task.vocab_size, architecture="decoder", backend=options.backend, **dims
    )
    return Memformer(cfg).to(options.device)


def run_demo(
    options: DemoOptions, log: Callable[[str], None] = print, progress: bool = True
) -> DemoReport:
    """Train with MRBP along the curriculum, evaluate, measure memory, plot; return the report."""
    T = options.num_segments
    task = RecallTask(segment_length=SIZES[options.size]["segment_length"])
    torch.manual_seed(options.seed)
    model = build_model(options, task)
    stages = curriculum(T, options.steps_per_stage, options.key_copies)
    curve, train_seconds, train_tokens_per_s = _train(options, task, model, stages, progress)

    # Held-out sequences come from another stream than the training ones.
    eval_gen = torch.Generator().manual_seed(options.seed + 1_000_003)
    ids, _, keys = task.sample(options.eval_sequences, T, generator=eval_gen)
    start = time.perf_counter()
    accuracy = recall_accuracy(model, ids, keys)
    eval_seconds = time.perf_counter() - start
    reset_accuracy = recall_accuracy(model, ids, keys, reset_memory=True)
    start = time.perf_counter()
    reach = (
        recall_by_length(
            model, task, options.reach_lengths, options.reach_sequences, generator=eval_gen
        )
        if options.reach_lengths
        else {}
    )
    reach_seconds = time.perf_counter() - start
    memory, what = _measure_memory(options, model, log) if options.measure_memory else ({}, "")
    report = DemoReport(
        options=options,
        num_parameters=sum(p.numel() for p in model.parameters()),
        accuracy=accuracy,
        reset_accuracy=reset_accuracy,
        chance=task.chance,
        train_tokens_per_s=train_tokens_per_s,
        eval_tokens_per_s=ids.numel() / max(eval_seconds, 1e-9),
        train_seconds=train_seconds,
        memory_mb=memory,
        memory_what=what,
        backend=_backend_name(model),
        device=_device_name(model.device),
        curve=curve,
        reach=reach,
        reach_seconds=reach_seconds,
    )
    if options.out_dir:
        out = Path(options.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = plot_curves(report.curve, report.chance, stages, out / "learning_curves.png")
        report.plot_path = str(path)
        summary = {k: v for k, v in asdict(report).items() if k != "curve"}
        (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report


def _train(
    options: DemoOptions, task: RecallTask, model: Memformer, stages: list[Stage], progress: bool
) -> tuple[dict[str, list[float]], float, float]:
    """Train ``model`` with MRBP along ``stages``: ``(curve, training seconds, tokens per second
    on the target length)``; ``curve`` as :func:`~memformer_fast.app.plotting.plot_curves`
    takes it."""
    from tqdm.auto import tqdm

    T, device = stages[-1].num_segments, model.device
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0)
    train_gen = torch.Generator().manual_seed(options.seed)
    total = sum(s.steps for s in stages)
    # Cosine decay to a tenth: at a constant 3e-3 the solved task's tiny gradients let Adam's
    # steps drift until recall collapses late in the run (docs/memory_learning.md).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=options.lr / 10)
    clip = SpikeClip()
    curve: dict[str, list[float]] = {"loss": [], "eval_step": [], "eval_acc": [], "stage_start": []}
    probe = {
        t: task.sample(128, t, generator=torch.Generator().manual_seed(options.seed + 7 + t))
        for t in {s.num_segments for s in stages}
    }
    step = 0
    train_seconds = 0.0
    final_tokens = final_seconds = 0.0
    disable = None if progress else True  # None: no bar when the output is not a terminal
    bar = tqdm(total=total, desc="demo", unit="step", disable=disable, leave=False)
    for stage in stages:
        curve["stage_start"].append(step)
        for _ in range(stage.steps):
            ids, labels, _ = task.sample(
                options.batch_size,
                stage.draw(train_gen),
                key_copies=stage.key_copies,
                generator=train_gen,
            )
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            result = mrbp.backward(model, ids.to(device), labels=labels.to(device))
            clip(model.parameters())
            opt.step()
            schedule.step()
            loss = float(result.loss)
            elapsed = time.perf_counter() - start
            train_seconds += elapsed
            if stage.num_segments == T:
                final_tokens += ids.numel()
                final_seconds += elapsed
            step += 1
            curve["loss"].append(loss)
            if step % options.eval_every == 0 or step == total:
                p_ids, _, p_keys = probe[stage.num_segments]
                curve["eval_step"].append(step)
                curve["eval_acc"].append(recall_accuracy(model, p_ids, p_keys))
            bar.update(1)
            bar.set_postfix(T=stage.label[2:], loss=f"{loss:.3f}", acc=curve["eval_acc"][-1:])
    bar.close()
    return curve, train_seconds, final_tokens / max(final_seconds, 1e-9)


def _measure_memory(
    options: DemoOptions, model: Memformer, log: Callable[[str], None]
) -> tuple[dict[str, float], str]:
    """Peak memory of one MRBP and one BPTT step at the target length and four times it, each
    in a fresh process: ``({"mrbp@T": MiB, ...}, how it was measured)``."""
    log("measuring the peak memory of MRBP and BPTT steps in fresh processes...")
    T = options.num_segments
    # 4T shows the trend: MRBP flat, BPTT linear in the rollout length.
    runs = [(method, t) for method in ("mrbp", "bptt") for t in (T, 4 * T)]
    measured = measure_peak_memory(
        runs, config=model.config.to_dict(), batch_size=options.batch_size,
        device=str(model.device), seed=options.seed,
    )  # fmt: skip
    what = next(iter(measured.values()))["what"]
    return {name: m["peak_mb"] for name, m in measured.items()}, what


def _backend_name(model: Memformer) -> str:
    return resolve_backend(model.config.backend, model.device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
