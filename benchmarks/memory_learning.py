"""Does the memory learn? Single-key recall from the defaults, for ablations and the seed matrix.

One run trains a small Memformer with :func:`memformer_fast.mrbp.backward` on the recall task of
:mod:`memformer_fast.app.recall` (a marker, then the key, at a random place of the first segment;
random content tokens, keys included, everywhere else; the query ends the last segment) along a
curriculum over the number of segments only, with AdamW and :class:`~memformer_fast.SpikeClip`,
and writes its learning curve and final accuracies (T = 8, T = 16, memory reset)
as JSON.

    python benchmarks/memory_learning.py --arch decoder --d-model 64 --seed 0 \\
        --out benchmarks/results/memory_learning/matrix
    python benchmarks/memory_learning.py ... --set embedding_init_std=0.02   # an ablation
    python benchmarks/memory_learning.py --report benchmarks/results/memory_learning

``--report DIR`` turns the runs in the subfolders of ``DIR`` named in :data:`GROUPS` into
``DIR/README.md`` (tables) and ``DIR/curves.png``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memformer_fast import mrbp
from memformer_fast.app.recall import AssociativeRecallTask, RecallTask, query_accuracy
from memformer_fast.clipping import DEFAULT_FACTOR, SpikeClip
from memformer_fast.config import MemformerConfig
from memformer_fast.model import Memformer

PROBE_SEQUENCES = 256
TASK = RecallTask(segment_length=16, num_keys=8, num_distractors=15)
DEFAULT_BETA2 = 0.999  # torch.optim.AdamW's

Task = RecallTask | AssociativeRecallTask


def task_from_args(args: argparse.Namespace) -> Task:
    """Single-key recall (:data:`TASK`), or associative recall of ``--pairs`` key-value pairs."""
    if not args.pairs:
        return TASK
    return AssociativeRecallTask(
        segment_length=TASK.segment_length, num_pairs=args.pairs, num_queries=args.queries,
        num_keys=args.keys, num_values=args.values, num_distractors=TASK.num_distractors,
    )  # fmt: skip


def default_lr(d_model: int) -> float:
    """1e-3 at width 64, scaled as 1 / d_model (as muP scales Adam's step for hidden weights).

    Constant Adam steps of 3e-3 solve the task at width 64, then blow it up with loss spikes at
    T = 8; 1e-3 learns as fast and stays. At width 256, 1e-3 collapsed two runs of four (gradient
    norms in the hundreds) where 3e-4 held for all three tried (see docs/memory_learning.md).
    """
    return 1e-3 * 64 / d_model


# Updates at a number of segments (or a range drawn from at every update). The encoder-decoder
# starts at 3 (at 2 its decoder cross-attends the key's segment: no memory needed). Every stage
# mixes lengths: trained on even lengths only the memory learnt to alternate from segment to
# segment (docs/memory_learning.md); the last stage reaches 16, the most the recipe trains on.
SCHEDULES = {"decoder": "100:2,100:2-4,1000:2-16", "encoder-decoder": "100:3,100:3-5,1000:3-16"}


def build_config(arch: str, d_model: int, task: Task, overrides: dict[str, Any]):
    """The issue's small model: 2 layers (2 + 2 for the encoder-decoder), 4 heads, 8 slots."""
    layers = (
        dict(n_decoder_layers=2)
        if arch == "decoder"
        else dict(n_encoder_layers=2, n_decoder_layers=2)
    )
    return MemformerConfig(
        vocab_size=task.vocab_size, d_model=d_model, n_heads=4, d_ff=4 * d_model,
        n_memory_slots=8, segment_length=task.segment_length, architecture=arch,
        backend="reference", **layers, **overrides,
    )  # fmt: skip


class RecallStream:
    """Recall rollouts whose memory is carried over from the row's earlier rollouts.

    Each rollout is a recall episode (a key in its first segment, a query for it at the end), but
    a row's memory is not reset between rollouts: it is the memory left by the row's previous
    rollout (all but its query segment, which is asked, not kept), and with probability
    ``restart`` per update the initial memory. So the model learns to write a key into a memory
    that has already run for many segments, and to read it back there, while the gradient still
    spans one rollout (truncated back-propagation through time, as when a long document is trained
    on rollout by rollout) and every query is answerable from that rollout. Trained from the
    initial memory alone, the model only sees memories at most a rollout old, and a memory streamed
    for 40 to 60 segments drifts into a state it never saw. Measured, it did not help: it taught
    the model to overwrite, i.e. to forget (docs/memory_learning.md, item 14).
    """

    def __init__(self, task: RecallTask, batch_size: int, restart: float) -> None:
        if not 0 < restart <= 1:
            raise ValueError(f"restart must be in (0, 1], got {restart!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.task, self.batch_size, self.restart = task, batch_size, restart
        self.memory: Tensor | None = None  # [B, S, D], carried; None before the first rollout

    def sample(
        self, num_segments: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids [B, T*L], labels [B, T*L], resets [B, T])`` of the next rollout; the rows
        that restart have ``resets[:, 0]`` set (all of them on the first rollout)."""
        ids, labels, _ = self.task.sample(self.batch_size, num_segments, generator=generator)
        resets = torch.zeros(self.batch_size, num_segments, dtype=torch.bool)
        resets[:, 0] = torch.rand(self.batch_size, generator=generator) < self.restart
        if self.memory is None:
            resets[:, 0] = True
        return ids, labels, resets

    @torch.no_grad()
    def advance(self, model: Memformer, input_ids: Tensor, resets: Tensor) -> None:
        """Carry the memory over the rollout's segments but its last (the query's)."""
        fresh = model.init_memory(self.batch_size)
        memory = fresh if self.memory is None else self.memory
        memory = torch.where(resets[:, :1, None].to(model.device), fresh, memory)
        segments = input_ids.to(model.device).split(self.task.segment_length, dim=1)
        for segment in segments[:-1]:
            _, memory = model.read_segment(segment, memory)
        self.memory = memory.detach()


def build_model(args: argparse.Namespace) -> Memformer:
    """The run's model (``--set FIELD=VALUE`` overrides its config), freshly initialised."""
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    return Memformer(build_config(args.arch, args.d_model, task_from_args(args), overrides))


def parse_schedule(text: str) -> list[tuple[int, int, int]]:
    """``"100:2,100:4,1000:3-8"`` -> ``[(100, 2, 2), (100, 4, 4), (1000, 3, 8)]``: updates, then
    the number of segments, or a range to draw it from uniformly at every update."""
    stages = []
    for part in text.split(","):
        updates, segments = part.split(":")
        low, _, high = segments.partition("-")
        stages.append((int(updates), int(low), int(high or low)))
    return stages


def train(args: argparse.Namespace) -> tuple[dict[str, Any], Memformer]:
    """Train one model along ``args.schedule``; its record (curve, final accuracies) and itself."""
    torch.set_num_threads(args.threads)
    task = task_from_args(args)
    torch.manual_seed(args.seed)
    model = build_model(args)
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=0.0
    )
    clip = SpikeClip(args.clip or math.inf, args.spike_factor or math.inf)
    batches = torch.Generator().manual_seed(args.seed)
    probes = {
        t: task.sample(PROBE_SEQUENCES, t, generator=torch.Generator().manual_seed(10_000 + t))
        for t in (8, 16)
    }
    stream = RecallStream(TASK, args.batch_size, args.carry) if args.carry else None
    curve: list[dict[str, float]] = []
    step, start, above = 0, time.perf_counter(), 0
    schedule = parse_schedule(args.schedule)
    stages = [(i, lo, hi) for i, (updates, lo, hi) in enumerate(schedule) for _ in range(updates)]
    last_stage_start = len(stages) - schedule[-1][0]
    stopped_early = False
    peak_loss = peak_norm = 0.0  # the largest since the last evaluation
    try:
        for stage, low, high in stages:
            num_segments = low
            if high > low:  # a mixed-length stage: recall must not depend on the rollout's length
                num_segments = int(torch.randint(low, high + 1, (1,), generator=batches))
            opt.zero_grad(set_to_none=True)
            if stream is not None and stage == len(schedule) - 1:
                ids, labels, resets = stream.sample(num_segments, generator=batches)
                result = mrbp.backward(model, ids, stream.memory, labels=labels, resets=resets)
                stream.advance(model, ids, resets)
            else:
                ids, labels, _ = task.sample(args.batch_size, num_segments, generator=batches)
                result = mrbp.backward(model, ids, labels=labels)
            # The norm before clipping: spikes announce a collapse.
            norm = clip(model.parameters())
            opt.step()
            step += 1
            peak_loss, peak_norm = max(peak_loss, float(result.loss)), max(peak_norm, float(norm))
            if step % args.eval_every:
                continue
            acc8, acc16 = (query_accuracy(model, *probes[t][:2]) for t in (8, 16))
            seconds = time.perf_counter() - start
            curve.append(dict(step=step, segments=num_segments, loss=float(result.loss),
                              peak_loss=peak_loss, peak_grad_norm=peak_norm,
                              acc8=acc8, acc16=acc16, seconds=seconds))  # fmt: skip
            peak_loss = peak_norm = 0.0
            print(json.dumps(curve[-1]), flush=True)
            above = above + 1 if acc8 >= args.stop_at else 0
            # Reached and held on the last stage: the rest of the budget would only confirm it
            # (the last stage's first updates are what carry recall to longer rollouts).
            into_last = step - last_stage_start
            if stage == len(schedule) - 1 and into_last >= args.min_final and above >= 2:
                break
    except KeyboardInterrupt:  # SIGTERM too (see main): the run so far is still a result
        stopped_early = True
    final = {
        "acc8": query_accuracy(model, *probes[8][:2]),
        "acc16": query_accuracy(model, *probes[16][:2]),
        "acc8_reset": query_accuracy(model, *probes[8][:2], reset_memory=True),
    }
    first = next((c["step"] for c in curve if c["acc8"] >= 0.95), None)
    record = dict(
        arch=args.arch, d_model=args.d_model, seed=args.seed, lr=args.lr, clip=args.clip,
        spike_factor=args.spike_factor, beta2=args.beta2, carry=args.carry,
        overrides=args.set, schedule=args.schedule, batch_size=args.batch_size, steps=step,
        stop_at=args.stop_at,
        first_step_95=first, seconds=time.perf_counter() - start, curve=curve, final=final,
        stopped_early=stopped_early,
        task={"name": type(task).__name__, **dataclasses.asdict(task)},
        chance=task.chance, machine=f"{platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s)", torch=torch.__version__,
    )  # fmt: skip
    return record, model


def run_name(args: argparse.Namespace) -> str:
    extra = "".join(f"_{s.replace('=', '')}" for s in args.set)
    lr = "" if args.lr == default_lr(args.d_model) else f"_lr{args.lr:g}"
    clip = "" if args.clip == 1.0 else f"_clip{args.clip:g}"
    spike = "" if args.spike_factor == DEFAULT_FACTOR else f"_spike{args.spike_factor:g}"
    carry = f"_carry{args.carry:g}" if args.carry else ""
    beta2 = "" if args.beta2 == DEFAULT_BETA2 else f"_beta2{args.beta2:g}"
    pairs = f"_pairs{args.pairs}q{args.queries}k{args.keys}v{args.values}" if args.pairs else ""
    return f"{args.arch}_d{args.d_model}_s{args.seed}{pairs}{extra}{lr}{clip}{spike}{beta2}{carry}"


def _changes(r: dict[str, Any]) -> list[str]:
    """What a run changed from today's defaults: its overrides, then lr, clip and the stopping
    threshold (above 1: trained to the end of its schedule) if not default."""
    lr = [f"lr={r['lr']:g}"] if r["lr"] != default_lr(r["d_model"]) else []
    clip = [f"clip={r['clip']:g}"] if r["clip"] != 1.0 else []
    # Runs from before SpikeClip clipped at the fixed limit only.
    spike = r.get("spike_factor", 0.0)
    clip += [f"spike-factor={spike:g}"] if spike != DEFAULT_FACTOR else []
    beta2 = r.get("beta2", DEFAULT_BETA2)
    clip += [f"beta2={beta2:g}"] if beta2 != DEFAULT_BETA2 else []
    stop = [f"stop-at={r['stop_at']:g}"] if r.get("stop_at", 0.97) != 0.97 else []
    note = [r["note"]] if "note" in r else []  # how a run was made differently, by hand
    return [*r["overrides"], *lr, *clip, *stop, *note]


def _table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| arch | d_model | seed | changed from the defaults | schedule | updates "
        "| first >= 95% at T=8 | T=8 | T=16 (trained on only in schedules to 16) "
        "| T=8, memory reset | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["arch"], r["d_model"], r["overrides"], r["seed"])):
        f = r["final"]
        updates = f"{r['steps']}" + (" (stopped)" if r.get("stopped_early") else "")
        lines.append(
            f"| {r['arch']} | {r['d_model']} | {r['seed']} | {', '.join(_changes(r)) or '-'} | "
            f"{r['schedule']} | {updates} | {r['first_step_95'] or 'never'} | {f['acc8']:.1%} | "
            f"{f['acc16']:.1%} | {f['acc8_reset']:.1%} | {r['seconds'] / 60:.0f} min |"
        )
    return lines


GROUPS = {
    "matrix": "the targets, from the defaults",
    "wider": "the defaults at a width beyond the targets' (one seed)",
    "ablations": "one change from the defaults",
    "fixed_clip": "the matrix before SpikeClip (gradients clipped at 1.0 only)",
    "old_lr": "the first matrix, at lr 3e-3 (before the lr was lowered)",
    "lr_range": "the recipe (mixed lengths to 16, memory bias 0.001) at lr 3e-4, 1e-3 and 3e-3, "
    "with SpikeClip and with clipping at 1.0 only, without memory noise (the library's default) "
    "and with noise 0.8; at 3e-3 with noise also AdamW beta2 0.95, and with it an extra stage "
    "of rollouts to 8 segments (file names ending _stage8)",
}


def _label(r: dict[str, Any]) -> str:
    return f"{r['arch']} d{r['d_model']} s{r['seed']} {' '.join(_changes(r))}"


def load_runs(folder: Path, groups: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """The run records (JSON) in each subfolder of ``folder`` named in ``groups``."""
    return {
        name: [json.loads(p.read_text()) for p in sorted((folder / name).glob("*.json"))]
        for name in groups
    }


def pyplot() -> Any:
    """``matplotlib.pyplot``, drawing to files only (the Agg backend): imported by the reports
    when they draw, so a training run needs no matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_readme(
    folder: Path,
    groups: dict[str, str],
    head: list[str],
    table: Callable[[list[dict[str, Any]]], list[str]],
    shared: str = "shared with other jobs",
) -> dict[str, list[dict[str, Any]]]:
    """``folder/README.md`` of a report over the runs in the subfolders named in ``groups``:
    ``head`` (title and method), a ``table`` per group that has runs, the runs' commands and
    the machine (``shared``: what its times are worth). Returns the runs by group, for the plots.
    """
    runs_by_group = load_runs(folder, groups)
    lines = list(head)
    for name, runs in runs_by_group.items():
        if runs:
            lines += ["", f"## {name}: {groups[name]}", "", *table(runs)]
    everything = [r for runs in runs_by_group.values() for r in runs]
    commands = sorted({r["command"] for r in everything if r.get("command")})
    if commands:
        lines += ["", "Commands:", "", "```", *commands, "```"]
    if everything:
        first = everything[0]
        lines += ["", f"Machine: {first.get('machine', '?')} ({shared}), "
                  f"torch {first.get('torch', '?')}."]  # fmt: skip
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return runs_by_group


def report(folder: Path) -> None:
    """``folder/README.md`` (a table per subfolder of :data:`GROUPS`) and ``folder/curves.png``."""
    head = [
        "# Single-key recall from the defaults",
        "",
        f"Generated by `python benchmarks/memory_learning.py --report {folder}` from one JSON per "
        f"run (with its learning curve) in {', '.join(f'`{g}/`' for g in GROUPS)}. A run: "
        "`python benchmarks/memory_learning.py --arch A --d-model D --seed S [--lr LR] "
        "[--set FIELD=VALUE] [--schedule ...]`. Batch 64, AdamW (no weight decay), gradients "
        "clipped by `SpikeClip` (at 1.0 and at 4x the running mean of the recent norms; "
        "`spike-factor=0`: at 1.0 only), lr 1e-3 x 64 / d_model (1e-3 at 64, 2.5e-4 at 256) "
        "unless the table says otherwise; a curriculum over the number of segments only "
        "(`schedule`: updates at a number of segments or a range drawn from), stopped once the "
        "T = 8 probe held "
        ">= 97% twice, at least `--min-final` updates into the last stage (200; 100 for the runs "
        "at lr 3e-3); 256 held-out probes per length, chance 12.5%. "
        '"(stopped)": ended early by hand (CPU budget), the accuracies are those of the model at '
        "that point.",
    ]
    shared = "shared with other jobs: times are not comparable"
    groups = write_readme(folder, GROUPS, head, _table, shared)
    panels = [
        ("matrix", "acc8"),
        ("matrix", "acc16"),
        ("fixed_clip", "acc16"),
        ("ablations", "acc8"),
    ]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True)
    for ax, (name, key) in zip(axes, panels):
        for i, r in enumerate(groups[name]):
            points = [(c["step"], c[key]) for c in r["curve"] if key in c]
            ax.plot(*zip(*points), lw=1, label=_label(r), color=f"C{i % 10}",
                    ls="-" if r["arch"] == "decoder" else "--")  # fmt: skip
        ax.axhline(0.125, color="gray", ls=":", label="chance")
        length = "T = 16" if key == "acc16" else "T = 8"
        ax.set(xlabel="update", title=f"{name}: {length}", ylim=(0, 1.02))
        ax.legend(fontsize=6)
    axes[0].set_ylabel("recall accuracy (held-out)")
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=100)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one training run (architecture, width, seed, optimiser, schedule, config)."""
    p.add_argument("--arch", default="decoder", choices=("decoder", "encoder-decoder"))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="default: 1e-3 x 64 / d_model, see default_lr")
    p.add_argument("--clip", type=float, default=1.0, help="0 turns clipping off")
    p.add_argument(
        "--spike-factor", type=float, default=DEFAULT_FACTOR,
        help="also clip to this many times the running mean of the recent norms (SpikeClip); "
        "0 turns it off",
    )  # fmt: skip
    p.add_argument(
        "--beta2", type=float, default=DEFAULT_BETA2,
        help="AdamW's second-moment decay (torch's default 0.999)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--schedule", help="default: the architecture's, see SCHEDULES")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--stop-at", type=float, default=0.97)
    p.add_argument("--min-final", type=int, default=200, help="updates on the last stage first")
    p.add_argument("--set", action="append", default=[], help="MemformerConfig FIELD=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--pairs", type=int, default=0,
        help="associative recall of this many key-value pairs (AssociativeRecallTask); "
        "0: single-key recall",
    )  # fmt: skip
    p.add_argument("--queries", type=int, default=1, help="keys asked per sequence (--pairs)")
    p.add_argument("--keys", type=int, default=8, help="key tokens (--pairs)")
    p.add_argument("--values", type=int, default=8, help="value tokens (--pairs)")
    p.add_argument(
        "--carry", type=float, default=0.0,
        help="on the last stage, carry the memory across updates: each row starts a new episode "
        "with this probability per update (RecallStream); 0: fresh rollouts only",
    )  # fmt: skip


def resolve_training_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on other options (schedule, learning rate)."""
    if args.carry and args.pairs:
        raise SystemExit("--carry streams single-key recall only; drop it or --pairs")
    args.schedule = args.schedule or SCHEDULES[args.arch]
    args.lr = args.lr or default_lr(args.d_model)


def save_run(args: argparse.Namespace, record: dict[str, Any]) -> Path:
    """Write a run's record as JSON to ``--out``, named by :func:`run_name`; return its path."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{run_name(args)}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def parse_run_arguments(
    p: argparse.ArgumentParser,
    report: Callable[[Path], None],
    resolve: Callable[[argparse.Namespace], None] = resolve_training_defaults,
) -> argparse.Namespace | None:
    """A benchmark's command line: with ``--report DIR``, write ``report(DIR)`` and return None;
    else fill in and check the defaults that depend on other options (``resolve``), let SIGTERM
    stop training as Ctrl-C does (the run then saves what it has) and return the arguments."""
    p.add_argument("--report", type=Path, help="write the report of the runs under DIR and exit")
    args = p.parse_args()
    if args.report:
        report(args.report)
        return None
    resolve(args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_learning/matrix"))
    args = parse_run_arguments(p, report)
    if args is None:
        return
    result, _ = train(args)
    path = save_run(args, result)
    print("final", json.dumps(result["final"]), "->", path)


if __name__ == "__main__":
    main()
