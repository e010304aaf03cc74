"""The long-range recall task behind ``memformer-fast demo``, its evaluation and the demo itself.

A sequence is ``T`` segments of ``L`` tokens. A key (one of ``num_keys`` tokens) sits at a random
position of the first segment, every other token is a random distractor, and the sequence ends
with a query token whose answer is the key. Only the answer is scored. Seen from the last segment
alone the key is unknowable, so a model whose memory is reset at every segment can only guess
(``1 / num_keys``); a model that remembers recalls it.

The demo trains a small decoder Memformer on this task with :func:`memformer_fast.mrbp.backward`,
compares it on held-out sequences with the same model with its memory reset, measures the
throughput and the peak memory of one MRBP step against one full-BPTT step, and plots the
learning curves.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import mrbp
from .config import MemformerConfig
from .model import IGNORE_INDEX, Memformer
from .presets import preset

QUERY_TOKEN = 1  # token 0 is the model's BOS and never appears in a sequence
MARKER_TOKEN = 2
FIRST_KEY = 3


@dataclass(frozen=True)
class RecallTask:
    """Token layout of the recall task: ``[BOS, QUERY, MARKER, keys..., other content...]``.

    The key is one of ``num_keys`` tokens and follows a marker at a random place of the first
    segment; every other position holds a random content token, keys included, so the key is known
    only by the marker before it (a model must bind the two before it writes the key into memory).
    """

    segment_length: int = 16
    num_keys: int = 8
    num_distractors: int = 15

    def __post_init__(self) -> None:
        if self.segment_length < 2:
            raise ValueError(f"segment_length must be >= 2, got {self.segment_length}")
        if self.num_keys < 2 or self.num_distractors < 1:
            raise ValueError("the recall task needs num_keys >= 2 and num_distractors >= 1")

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.num_keys + self.num_distractors

    @property
    def chance(self) -> float:
        """The accuracy of a guess: what a model without memory can reach."""
        return 1.0 / self.num_keys

    def sample(
        self,
        batch_size: int,
        num_segments: int,
        *,
        key_copies: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids [B, T*L], labels [B, T*L], keys [B])`` on the CPU.

        ``key_copies`` marker-key pairs sit in the first segment (more copies make an easier task;
        one is the task itself). ``labels`` are -100 except the last position, whose label is the
        key: the query (second to last token) predicts it.
        """
        L = self.segment_length
        if num_segments < 2:
            raise ValueError(f"num_segments must be >= 2, got {num_segments}")
        if not 1 <= key_copies <= L // 2:
            raise ValueError(f"key_copies must be in [1, {L // 2}], got {key_copies}")
        ids = torch.randint(
            FIRST_KEY, self.vocab_size, (batch_size, num_segments * L), generator=generator
        )
        last_key = FIRST_KEY + self.num_keys
        keys = torch.randint(FIRST_KEY, last_key, (batch_size,), generator=generator)
        if key_copies == 1:
            markers = torch.randint(0, L - 1, (batch_size, 1), generator=generator)
        else:  # distinct pairs (2i, 2i + 1)
            pairs = torch.rand(batch_size, L // 2, generator=generator).argsort(dim=1)
            markers = 2 * pairs[:, :key_copies]
        ids[:, :L].scatter_(1, markers, MARKER_TOKEN)
        ids[:, :L].scatter_(1, markers + 1, keys[:, None].expand_as(markers))
        ids[:, -2] = QUERY_TOKEN
        ids[:, -1] = keys
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -1] = keys
        return ids, labels, keys


@torch.no_grad()
def recall_accuracy(
    model: Memformer,
    input_ids: Tensor,
    keys: Tensor,
    *,
    reset_memory: bool = False,
    batch_size: int = 256,
) -> float:
    """Fraction of sequences whose query the model answers with the key (greedy).

    The decoder reads the last segment with the memory of the ones before; the encoder-decoder
    decodes the last segment from the encoding of the one before it (which read the memory of the
    earlier ones). ``reset_memory=True`` gives that last step the initial memory: it then sees no
    trace of the first segment (for rollouts of three segments or more), so only its own forward
    pass is needed.
    """
    was_training = model.training
    model.eval()
    L = model.config.segment_length
    encoder_decoder = model.config.architecture == "encoder-decoder"
    context_segments = 2 if encoder_decoder else 1
    correct = 0
    try:
        for ids, key in zip(input_ids.split(batch_size), keys.split(batch_size)):
            ids = ids.to(model.device)
            segments = ids.split(L, dim=1)
            memory = None
            if not reset_memory:
                memory = model.init_memory(len(ids))
                for segment in segments[:-context_segments]:
                    _, memory = model.read_segment(segment, memory)
            if encoder_decoder:
                decoder_input_ids, _ = model._shift_right(segments[-1], None)
                out = model(segments[-2], memory=memory, decoder_input_ids=decoder_input_ids)
            else:
                out = model(segments[-1], memory=memory)
            assert out.logits is not None
            correct += int((out.logits[:, -2].argmax(-1).cpu() == key).sum())
    finally:
        model.train(was_training)
    return correct / len(input_ids)


# ---------------------------------------------------------------------------------------- demo


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: ``steps`` updates on rollouts of ``num_segments`` segments."""

    num_segments: int
    key_copies: int
    steps: int


def curriculum(num_segments: int, steps_per_stage: int, key_copies: int = 1) -> list[Stage]:
    """Rollouts doubled from 2 segments up to ``num_segments``, a single key throughout.

    ``steps_per_stage`` updates per stage, twice as many on the target length. ``key_copies > 1``
    adds a first stage of two segments with that many marker-key pairs (an easier start; the
    defaults learn without it, docs/memory_learning.md).
    """
    n = steps_per_stage
    stages = [Stage(2, key_copies, n)] if key_copies > 1 else []
    t = 2
    while t < num_segments:
        stages.append(Stage(t, 1, n))
        t *= 2
    stages.append(Stage(num_segments, 1, 2 * n))
    return stages


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
    from tqdm.auto import tqdm

    L = SIZES[options.size]["segment_length"]
    T = options.num_segments
    if T < 2:
        raise ValueError(f"--segments must be >= 2, got {T}")
    task = RecallTask(segment_length=L)
    torch.manual_seed(options.seed)
    model = build_model(options, task)
    device = model.device
    opt = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=0.0)
    train_gen = torch.Generator().manual_seed(options.seed)
    # Held-out sequences come from another stream than the training ones.
    eval_gen = torch.Generator().manual_seed(options.seed + 1_000_003)
    stages = curriculum(T, options.steps_per_stage, options.key_copies)
    total = sum(s.steps for s in stages)
    # Cosine decay to a tenth: at a constant 3e-3 the solved task's tiny gradients let Adam's
    # steps drift until recall collapses late in the run (docs/memory_learning.md).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=options.lr / 10)
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
                stage.num_segments,
                key_copies=stage.key_copies,
                generator=train_gen,
            )
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            result = mrbp.backward(model, ids.to(device), labels=labels.to(device))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
            bar.set_postfix(T=stage.num_segments, loss=f"{loss:.3f}", acc=curve["eval_acc"][-1:])
    bar.close()

    ids, _, keys = task.sample(options.eval_sequences, T, generator=eval_gen)
    start = time.perf_counter()
    accuracy = recall_accuracy(model, ids, keys)
    eval_seconds = time.perf_counter() - start
    reset_accuracy = recall_accuracy(model, ids, keys, reset_memory=True)

    memory: dict[str, float] = {}
    what = ""
    if options.measure_memory:
        log("measuring the peak memory of MRBP and BPTT steps in fresh processes...")
        # 4T shows the trend: MRBP flat, BPTT linear in the rollout length.
        runs = [(method, t) for method in ("mrbp", "bptt") for t in (T, 4 * T)]
        measured = measure_peak_memory(
            runs, config=model.config.to_dict(), batch_size=options.batch_size,
            device=str(device), seed=options.seed,
        )  # fmt: skip
        memory = {name: m["peak_mb"] for name, m in measured.items()}
        what = next(iter(measured.values()))["what"]

    report = DemoReport(
        options=options,
        num_parameters=sum(p.numel() for p in model.parameters()),
        accuracy=accuracy,
        reset_accuracy=reset_accuracy,
        chance=task.chance,
        train_tokens_per_s=final_tokens / max(final_seconds, 1e-9),
        eval_tokens_per_s=ids.numel() / max(eval_seconds, 1e-9),
        train_seconds=train_seconds,
        memory_mb=memory,
        memory_what=what,
        backend=_backend_name(model),
        device=_device_name(device),
        curve=curve,
    )
    if options.out_dir:
        out = Path(options.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report.plot_path = str(plot_curves(report, out / "learning_curves.png"))
        summary = {k: v for k, v in asdict(report).items() if k != "curve"}
        (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report


def _backend_name(model: Memformer) -> str:
    from .backends import resolve_backend

    return resolve_backend(model.config.backend, model.device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def plot_curves(report: DemoReport, path: Path) -> Path:
    """Training loss and held-out-probe accuracy against steps, curriculum stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.curve
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(curve["loss"]) + 1)
    ax_loss.plot(steps, curve["loss"], lw=0.6, alpha=0.4, color="C0")
    window = 20
    if len(curve["loss"]) >= window:
        smooth = torch.tensor(curve["loss"]).unfold(0, window, 1).mean(1).tolist()
        ax_loss.plot(range(window, len(curve["loss"]) + 1), smooth, color="C0", label="loss")
    ax_loss.set(xlabel="step", ylabel="cross-entropy of the answer", yscale="log")
    ax_loss.set_title("MRBP training loss")
    ax_acc.plot(curve["eval_step"], curve["eval_acc"], "o-", ms=3, label="with memory")
    ax_acc.axhline(report.chance, ls="--", color="gray", label="chance")
    ax_acc.set(xlabel="step", ylabel="recall accuracy", ylim=(0, 1.02))
    ax_acc.set_title("Recall on held-out probes (current rollout length)")
    stages = curriculum(
        report.options.num_segments, report.options.steps_per_stage, report.options.key_copies
    )
    for ax in (ax_loss, ax_acc):
        for i, (start, stage) in enumerate(zip(curve["stage_start"], stages)):
            if i % 2:
                ax.axvspan(start, start + stage.steps, color="gray", alpha=0.08, lw=0)
            label = f"T={stage.num_segments}" + (
                f"\n×{stage.key_copies}" if stage.key_copies > 1 else ""
            )
            ax.text(
                start + 2, 0.97, label, transform=ax.get_xaxis_transform(), fontsize=7, va="top"
            )
    ax_acc.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ peak memory probes


def measure_peak_memory(
    runs: Sequence[tuple[str, int]], *, config: dict, batch_size: int, device: str, seed: int = 0
) -> dict[str, dict]:
    """Peak memory of one training step for each ``(method, num_segments)`` of ``runs``
    (``method`` "mrbp" or "bptt"), each in a fresh process; all run at once.

    Returns ``{"method@T": {"peak_mb": ..., "what": ...}}``. A fresh process makes a measurement
    independent of whatever ran before. On CUDA it is ``torch.cuda.max_memory_allocated`` above
    the memory allocated before the step; on CPU the growth of the peak resident set size (VmHWM,
    reset just before the step) over the RSS at that point. Both after building the model and
    warm-up steps on a short rollout.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import sys; from memformer_fast.tasks import _memory_probe; _memory_probe(sys.argv[1])"
    procs = {}
    for method, num_segments in runs:
        args = dict(method=method, config=config, batch_size=batch_size,
                    num_segments=num_segments, device=device, seed=seed)  # fmt: skip
        procs[f"{method}@{num_segments}"] = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the memory probe {name} failed:\n{err.strip()}")
        results[name] = json.loads(out.strip().splitlines()[-1])
    return results


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark where Linux allows it and return the RSS to measure from.

    ``ru_maxrss`` alone would be wrong here: Linux carries it over ``exec`` from the parent, so a
    child of a large process starts with the parent's peak and a small step shows no growth.
    ``/proc/self/status`` VmHWM belongs to this process's own address space.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        rss = _proc_status_bytes("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return _peak_rss()


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _memory_probe(raw: str) -> None:
    """Child side of :func:`measure_peak_memory`: prints one JSON line."""
    args = json.loads(raw)
    torch.manual_seed(args["seed"])
    torch.set_num_threads(1)  # several probes run at once; threads do not change the memory
    device = torch.device(args["device"])
    model = Memformer(MemformerConfig.from_dict(args["config"])).to(device)
    task = RecallTask(segment_length=model.config.segment_length)
    ids, labels, _ = task.sample(args["batch_size"], args["num_segments"])
    ids, labels = ids.to(device), labels.to(device)
    # Warm-up: one MRBP and one BPTT step on two segments of one sequence. Lazy initialisation
    # (autograd engine, kernel workspaces, .grad tensors) is not the rollout's cost, and a batch
    # of one leaves too little in the allocator's caches to hide the step's own allocations.
    L = model.config.segment_length
    mrbp.backward(model, ids[:1, : 2 * L], labels=labels[:1, -2 * L :])
    model.sequence_loss(ids[:1, : 2 * L], labels=labels[:1, -2 * L :])[0].backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_peak_rss()
    if args["method"] == "mrbp":
        mrbp.backward(model, ids, labels=labels)
    else:
        loss, _ = model.sequence_loss(ids, labels=labels)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        what = "torch.cuda.max_memory_allocated of one step, fresh process"
    else:
        peak = (_peak_rss() - base) / 2**20
        what = "growth of the peak RSS during one step, fresh process"
    print(json.dumps({"peak_mb": peak, "what": what}))
