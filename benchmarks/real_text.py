"""What the memory buys on real text: the Python standard library's sources.

Usage::

    python benchmarks/real_text.py              # the full run (about 15-20 min on 2 CPU cores)
    python benchmarks/real_text.py --smoke      # about a minute: checks the pipeline only
    make real-text                              # the full run

The standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``, without its ``test``
package and without installed packages) are split into training and held-out files by a hash of
their path (one in ten held out; the same split on every machine with the same Python). The same
byte-level decoder Memformer is trained twice with ``memformer-fast train`` on the training files,
each file starting a segment with a fresh memory (``--reset-at-file-boundaries``): once with its
memory, once with the memory reset before every segment (``--memory-reset-every-segment``, the
no-memory baseline: same parameters, same steps, same bytes). Then ``memformer-fast eval`` scores
both on the held-out files. The script writes ``results.md`` and ``results.json`` (commands,
training times, machine, versions, date) into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SEGMENT = 64
# The full run: a 4-layer decoder of width 128 (0.8M parameters), rollouts of 8 segments of 64
# bytes, batch 8; the steps fill --minutes of training per run on this machine (calibrated).
FULL = dict(
    d_model=128,
    n_heads=4,
    layers=4,
    slots=16,
    batch_size=8,
    segments=8,
    lr=2e-3,
    held_out_bytes=300_000,
    minutes=7.0,
)
SMOKE = dict(
    d_model=64,
    n_heads=2,
    layers=2,
    slots=8,
    batch_size=4,
    segments=4,
    lr=2e-3,
    held_out_bytes=8_000,
    minutes=0.1,
)
SKIP_DIRS = {"test", "site-packages", "dist-packages", "__pycache__", "idlelib"}


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's folder and its ``.py`` files (relative paths, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and rel.parts[0] in SKIP_DIRS:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [str(rel / f) for f in sorted(filenames) if f.endswith(".py")]
    return root, sorted(files)


def path_hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def split_files(root: Path, files: list[str], work: Path) -> tuple[Path, Path, dict[str, int]]:
    """Link the files into ``work/train`` and ``work/held_out`` (one in ten by path hash), named
    by hash so that their sorted order is a fixed shuffle: ``--max-bytes`` then takes a sample
    of the library, not its first modules alphabetically."""
    train, held = work / "train", work / "held_out"
    counts = {"train_files": 0, "held_out_files": 0, "train_bytes": 0, "held_out_bytes": 0}
    for folder in (train, held):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for rel in files:
        h = path_hash(rel)
        kind = "held_out" if h % 10 == 0 else "train"
        link = (held if kind == "held_out" else train) / f"{h:016x}_{rel.replace(os.sep, '.')}"
        link.symlink_to(root / rel)
        counts[f"{kind}_files"] += 1
        counts[f"{kind}_bytes"] += (root / rel).stat().st_size
    return train, held, counts


def run_together(commands: dict[str, list[str]], logs: Path) -> dict[str, float]:
    """Run the commands side by side (one core each), their output in ``logs/NAME.log``; return
    each one's wall time. Exits if one fails."""
    procs, files, start, seconds = {}, {}, time.perf_counter(), {}
    for name, command in commands.items():
        print("$", shlex.join(command), flush=True)
        files[name] = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = subprocess.Popen(command, stdout=files[name], stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        code = proc.wait()
        seconds[name] = time.perf_counter() - start
        files[name].close()
        if code:
            sys.exit(f"{name} failed ({code}); see {logs / (name + '.log')}")
        print(f"{name}: done in {seconds[name] / 60:.1f} min", flush=True)
    return seconds


def step_seconds(cfg: dict[str, Any], threads: int) -> float:
    """Seconds of one MRBP training step of the run's model and batch on this machine (the
    median of three after a warm-up), for choosing the number of steps."""
    import torch

    from memformer_fast import Memformer, MemformerConfig, mrbp

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = MemformerConfig(
        vocab_size=256, d_model=cfg["d_model"], n_heads=cfg["n_heads"], d_ff=4 * cfg["d_model"],
        n_decoder_layers=cfg["layers"], n_memory_slots=cfg["slots"], segment_length=SEGMENT,
        architecture="decoder",
    )  # fmt: skip
    model = Memformer(config)
    ids = torch.randint(0, 256, (cfg["batch_size"], cfg["segments"] * SEGMENT))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        mrbp.backward(model, ids)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times[1:])[1]


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def markdown(results: dict[str, Any]) -> str:
    evals, m, s = results["eval"], results["machine"], results["settings"]
    buckets = evals["memory"]["by_segment_in_file"]
    names = [("segment " if b["first"] == b["last"] else "segments ") + b["segments"]
             for b in buckets]  # fmt: skip
    lines = [
        "| model | memory at evaluation | all | " + " | ".join(names) + " |",
        "|" + "---|" * (3 + len(buckets)),
    ]
    rows = [
        ("with memory", "carried", "memory", "memory_carried"),
        ("with memory", "reset every segment", "memory", "memory_reset_every_segment"),
        ("no-memory baseline", "reset every segment", "baseline", "memory_reset_every_segment"),
    ]
    for label, how, run_name, key in rows:
        report = evals[run_name]
        cells = [report["bits_per_byte"][key]] + [b[key] for b in report["by_segment_in_file"]]
        lines.append(f"| {label} | {how} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    counts = [evals["memory"]["predicted_bytes"]] + [b["bytes"] for b in buckets]
    lines.append("| bytes scored | | " + " | ".join(f"{c:,}" for c in counts) + " |")
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["train_seconds"].items())
    per_step = (
        f" ({s['seconds_per_step']} s per step measured before)"
        if s.get("seconds_per_step")
        else ""
    )
    return "\n".join(
        [
            "# What the memory buys on real text",
            "",
            f"Bits per byte (lower is better) on {evals['memory']['files']} held-out files "
            f"({evals['memory']['bytes']:,} bytes) of the Python {m['python']} standard library, "
            f"overall and by the index of the {SEGMENT}-byte segment within its file. Both models "
            f"are the same decoder Memformer ({evals['memory']['parameters']:,} parameters: width "
            f"{s['d_model']}, {s['layers']} layers, {s['slots']} memory slots), trained with MRBP "
            f"for {s['steps']} steps (batch {s['batch_size']}, rollouts of {s['segments']} "
            f"segments, lr {s['lr']}) on the first {s['max_bytes']:,} bytes of the other files "
            "(in path-hash order), each file starting on a segment with a fresh memory. The "
            "baseline was trained with its memory reset before every segment.",
            "",
            *lines,
            "",
            f"- Training time, the two runs side by side, one thread each: {times}{per_step}.",
            f"- Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}; Python {m['python']}, "
            f"torch {m['torch']}; {results['date']}.",
            f"- Data: {results['data']['train_files']} training and "
            f"{results['data']['held_out_files']} held-out files (one in ten, by a hash of the "
            "path); the `test` and `idlelib` packages are left out.",
            "- Reproduce: `" + results["script"] + "`, which runs:",
            "",
            "```bash",
            *results["commands"],
            "```",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a quick check of the pipeline")
    parser.add_argument("--minutes", type=float, help="training time per run (default 7)")
    parser.add_argument("--steps", type=int, help="training steps per run (default: calibrated)")
    parser.add_argument("--work", default="runs/real_text", help="checkpoints and file links")
    parser.add_argument("--out", help="results folder (default benchmarks/results/real_text)")
    args = parser.parse_args()
    cfg: dict[str, Any] = dict(SMOKE if args.smoke else FULL)
    if args.minutes:
        cfg["minutes"] = args.minutes
    work = Path(args.work)
    default_out = work / "smoke" if args.smoke else ROOT / "benchmarks/results/real_text"
    # Relative to the working directory: the commands written into results.md stay portable.
    out = Path(os.path.relpath(Path(args.out) if args.out else default_out))
    out.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    train_dir, held_dir, data = split_files(root, files, work)

    # The two runs train side by side, one thread each: same machine load, same steps.
    if args.steps:
        cfg["steps"], cfg["seconds_per_step"] = args.steps, None
    else:
        seconds = step_seconds(cfg, threads=1)
        cfg["seconds_per_step"] = round(seconds, 3)
        cfg["steps"] = max(4, int(cfg["minutes"] * 60 / seconds))
        print(f"one step takes {seconds:.2f} s here: {cfg['steps']} steps per run", flush=True)
    steps = cfg["steps"]
    # Enough bytes that no training byte is seen twice (plus the trainer's own 2% held out).
    max_bytes = int(steps * cfg["batch_size"] * cfg["segments"] * SEGMENT * 1.05) + 100_000
    tool = [sys.executable, "-m", "memformer_fast"]
    train = [
        "train", str(train_dir), "--glob", "*.py", "--max-bytes", str(max_bytes),
        "--architecture", "decoder", "--d-model", str(cfg["d_model"]),
        "--n-heads", str(cfg["n_heads"]), "--layers", str(cfg["layers"]),
        "--slots", str(cfg["slots"]), "--segment-length", str(SEGMENT),
        "--steps", str(steps), "--batch-size", str(cfg["batch_size"]),
        "--segments", str(cfg["segments"]), "--lr", str(cfg["lr"]),
        "--warmup-steps", str(max(1, steps // 10)), "--val-fraction", "0.02",
        "--eval-every", str(max(1, steps // 2)), "--eval-bytes", "16384",
        "--save-every", str(steps), "--reset-at-file-boundaries",
        "--threads", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    extra = {"memory": [], "baseline": ["--memory-reset-every-segment"]}
    for name in extra:
        (work / name / "checkpoint.pt").unlink(missing_ok=True)
    trains = {k: [*tool, *train, "--out", str(work / k), *more] for k, more in extra.items()}
    train_seconds = run_together({f"train_{k}": v for k, v in trains.items()}, out)
    evals = {
        name: [*tool, "eval", str(work / name), str(held_dir), "--glob", "*.py",
               "--max-bytes", str(cfg["held_out_bytes"]), "--json", str(out / f"eval_{name}.json"),
               "--threads", "1", "--device", "cpu", "--no-progress"]
        for name in extra
    }  # fmt: skip
    run_together({f"eval_{k}": v for k, v in evals.items()}, out)
    script = shlex.join(["python", "benchmarks/real_text.py", *sys.argv[1:]])
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "script": script,
        "settings": {**cfg, "max_bytes": max_bytes},
        "data": {"stdlib": str(root), **data},
        "train_seconds": {k.removeprefix("train_"): round(v, 1) for k, v in train_seconds.items()},
        "machine": machine(),
        "commands": [
            shlex.join(["memformer-fast", *c[3:]]) for c in [*trains.values(), *evals.values()]
        ],
        "eval": {name: json.loads((out / f"eval_{name}.json").read_text()) for name in extra},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
