"""Turn a pytest-benchmark JSON file of this suite into a Markdown report and PNG plots.

Usage::

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--out DIR]

writes ``DIR/results.md`` and ``DIR/{ops,model,rollouts,table3,peer}.png`` (for the suites the
files hold; ``DIR`` defaults to the first file's folder). Several files (for example the suite
split over two commands on a GPU) are merged; the machine is taken from the first. The report
names the machine, the library versions, the date and the exact commands. Times are medians.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Row = dict[str, Any]
OP_BACKENDS = ("reference", "compile", "triton", "sdpa")
ROLLOUT_METHODS = ("bptt", "checkpoint", "mrbp", "mrbp-offload")
PEER_METHODS = ("peer-mrbp", "mrbp-last", "mrbp")
PEER_LABELS = {
    "peer-mrbp": "lucidrains memformer 0.3.1, its MRBP (last segment scored)",
    "mrbp-last": "memformer_fast MRBP, same task (last segment scored)",
    "mrbp": "memformer_fast MRBP, own objective (every later segment scored)",
}
PEER_DIFFERENCES = """\
Where the two models differ (same width, heads, d_ff, depths, slots, segment length, vocabulary):

- **Objective.** The peer's `memory_replay_backprop` scores only a target sequence attached to the
  last segment (its only mode); ours scores every segment after the first. `mrbp-last` runs ours
  on the peer's task (one decoder pass per rollout) for a like-for-like time.
- **Memory update.** Peer: a full attention module (slots attend to themselves and the tokens),
  then a `GRUCell` and a residual feed-forward on the slots, initial memory a free parameter.
  Ours: the paper's slot-wise write attention (one self logit per slot, temperature 0.5), a
  sigmoid gate and biased memory normalisation; `M_0 = bias / ||bias||`.
- **Attention.** Peer: einsum attention with the full logits tensor and T5-style relative position
  buckets. Ours: `scaled_dot_product_attention` with rotary embeddings; the memory read and write
  through the fused operations (reference backend on CPU, Triton on CUDA).
- **Embeddings.** Peer: separate encoder and decoder embeddings, an untied output layer, biased
  projections. Ours: one embedding tied to the output layer, bias-free attention projections.
- **MRBP.** Peer: a Python list of memory states; per segment two backward calls
  (`retain_graph=True`: the loss, then the memory with its gradient, a zero gradient for the last
  segment). Ours: a preallocated replay buffer and one `torch.autograd.backward` per segment;
  gradients match full BPTT, dropout included.
"""


def load(paths: list[Path]) -> dict[str, Any]:
    """The first file's run, with the benchmarks and commands of every file."""
    runs = [json.loads(path.read_text()) for path in paths]
    data = runs[0]
    data["benchmarks"] = [b for run in runs for b in run["benchmarks"]]
    data["commands"] = [
        run["machine_info"].get("memformer_bench", {}).get("command") for run in runs
    ]
    return data


def suite(data: dict[str, Any], name: str) -> list[Row]:
    """The benchmarks of one suite as flat rows: extra_info plus ``median_ms``."""
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("suite") == name:
            rows.append({**info, "median_ms": bench["stats"]["median"] * 1e3})
    return rows


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent for ordinary magnitudes)."""
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it as a PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(
    title: str, intro: str, head: list[str], body: list[list[str]], image: str, alt: str
) -> str:
    """A Markdown section: title, introduction, table and image."""
    return "\n".join([f"## {title}", "", intro, "", table(head, body), "", f"![{alt}]({image})"])


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


# ----------------------------------------------------------------------------- sections


def header(data: dict[str, Any], json_paths: list[Path], out: Path) -> str:
    info = data["machine_info"].get("memformer_bench", {})
    commit = data.get("commit_info", {})
    device = info.get("device", data["machine_info"].get("cpu", {}).get("brand_raw", "?"))
    kind = info.get("device_type", "?")
    cores = info.get("cpu_count")
    lines = [
        f"# memformer_fast benchmarks: {device}",
        "",
        f"- **Machine:** {device} ({kind}"
        + (f", CUDA {info['cuda']}" if info.get("cuda") else "")
        + (f"; {cores} CPU cores, torch threads {info.get('torch_threads')}" if cores else "")
        + ")",
        f"- **Libraries:** python {info.get('python')}, torch {info.get('torch')}, "
        f"triton {info.get('triton')}, memformer_fast {info.get('memformer_fast')}, "
        f"peer memformer {info.get('peer_memformer') or 'not installed'}",
        f"- **Date:** {data.get('datetime', '?')}"
        + (
            f"; commit {commit.get('id', '?')[:10]}"
            + (" (dirty tree)" if commit.get("dirty") else "")
            if commit
            else ""
        ),
        *(f"- **Command:** `{command}`" for command in data["commands"]),
        f"- **Report:** `python benchmarks/report.py {shlex.join(map(str, json_paths))} "
        f"--out {out}`",
        "- Times are medians over pytest-benchmark rounds after warm-up rounds, wall clock with "
        "the device synchronised inside the timed function.",
    ]
    if kind == "cpu":
        lines.append(
            "- CPU timings come from a shared machine (other jobs were running): read ratios, "
            "not absolute numbers, and expect +-20% noise."
        )
    return "\n".join(lines)


def ops_section(rows: list[Row], out: Path) -> str | None:
    if not rows:
        return None
    on_cuda = any("fraction_of_floor" in r for r in rows)
    by_case: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by_case[(r["op"], r["mode"], r["dtype"], r["L"] or 0, r["S"])][r["backend"]] = r
    backends = [b for b in OP_BACKENDS if any(r["backend"] == b for r in rows)]
    head = ["op", "mode", "dtype", "L", "S"] + [f"{b} ms" for b in backends]
    head += ["best vs reference"]
    if on_cuda:
        head += ["triton GB/s", "triton fraction of floor"]
    body = []
    for key in sorted(by_case):
        op, mode, dtype, length, slots = key
        cases = by_case[key]
        ref = cases.get("reference", {}).get("median_ms")
        best_backend = min(cases, key=lambda b: cases[b]["median_ms"])
        row = [op, mode, dtype, str(length or "-"), str(slots)]
        row += [fmt(cases[b]["median_ms"]) if b in cases else "-" for b in backends]
        speedup = ratio(ref, cases[best_backend]["median_ms"])
        row.append(f"{best_backend} x{fmt(speedup)}" if speedup else "-")
        if on_cuda:
            tri = cases.get("triton", {})
            row += [fmt(tri.get("achieved_GBps")), fmt(tri.get("fraction_of_floor"))]
        body.append(row)
    plot_ops(by_case, backends, out / "ops.png")
    text = [
        "Median time per call (ms). `compile` is the reference under `torch.compile(dynamic=True)`;"
        " `sdpa` is `scaled_dot_product_attention` (memory read only); `fwd+bwd` uses a random "
        "upstream gradient.",
    ]
    if on_cuda:
        text.append(
            "The fraction of the floor is the time to copy the bytes the operation must move "
            "(inputs and outputs once; for fwd+bwd also the gradients) at the measured "
            "device-to-device copy bandwidth, over the kernel's CUDA-event time with inputs "
            "rotated beyond L2."
        )
    return section("Operations", "\n".join(text), head, body, "ops.png", "operations")


def plot_ops(by_case: dict[tuple, dict[str, Row]], backends: list[str], path: Path) -> None:
    ops = sorted({k[0] for k in by_case})
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        keys = sorted(k for k in by_case if k[0] == op)
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            xs = [j + i * width for j, k in enumerate(keys) if backend in by_case[k]]
            ys = [by_case[k][backend]["median_ms"] for k in keys if backend in by_case[k]]
            if xs:
                ax.bar(xs, ys, width, label=backend)
        labels = [
            f"{m}\n{d}\n" + (f"L{length} " if length else "") + f"S{s}"
            for _, m, d, length, s in keys
        ]
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(op)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def model_section(rows: list[Row], out: Path) -> str | None:
    if not rows:
        return None
    head = ["size", "parameters", "backend", "dtype", "batch", "ms / step", "tokens/s"]
    body = [
        [
            r["size"],
            f"{r['parameters'] / 1e6:.1f}M",
            r["backend"],
            r["dtype"],
            str(r["batch"]),
            fmt(r["median_ms"]),
            fmt(r["tokens_per_s"]),
        ]
        for r in sorted(rows, key=lambda r: (r["dtype"], r["backend"]))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([f"{r['backend']}\n{r['dtype']}" for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"training step, {rows[0]['size']}, batch {rows[0]['batch']}")
    save_figure(fig, out / "model.png")
    intro = (
        "One segment: encoder and memory write on `s_t`, decoder predicting `s_{t+1}`, "
        "backward through the loss and the new memory. Tokens/s counts the predicted tokens."
    )
    title = "Training step (encoder-decoder)"
    return section(title, intro, head, body, "model.png", "training step")


def rollout_rows(rows: list[Row]) -> list[Row]:
    """Add ``speed`` (BPTT time / time) and ``memory_ratio`` (peak / BPTT peak) per rollout."""
    base = {r["segments"]: r for r in rows if r["method"] == "bptt"}
    for r in rows:
        b = base.get(r["segments"])
        r["speed"] = ratio(b["median_ms"], r["median_ms"]) if b else None
        r["memory_ratio"] = ratio(r.get("peak_mb"), b.get("peak_mb")) if b else None
    return sorted(rows, key=lambda r: (r["segments"], ROLLOUT_METHODS.index(r["method"])))


def rollouts_section(rows: list[Row], out: Path) -> str | None:
    if not rows:
        return None
    rows = rollout_rows(rows)
    r0 = rows[0]
    head = ["T", "method", "ms / rollout", "speed vs BPTT", "peak MB", "memory vs BPTT"]
    body = [
        [
            str(r["segments"]),
            r["method"],
            fmt(r["median_ms"]),
            f"x{fmt(r['speed'], 2)}" if r["speed"] is not None else "-",
            fmt(r.get("peak_mb")),
            f"x{fmt(r['memory_ratio'], 2)}" if r["memory_ratio"] is not None else "-",
        ]
        for r in rows
    ]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in ROLLOUT_METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        ts = [r["segments"] for r in mine]
        ax_mem.plot(ts, [r.get("peak_mb") or 0 for r in mine], "o-", label=method)
        ax_time.plot(ts, [r["median_ms"] for r in mine], "o-", label=method)
    for ax, label in ((ax_mem, "peak MB"), (ax_time, "ms / rollout")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("segments T")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"MRBP vs BPTT vs checkpointing ({r0['size']}, batch {r0['batch']})")
    save_figure(fig, out / "rollouts.png")
    intro = (
        f"{_model(r0)}, batch {r0['batch']}. One training step over a rollout of T segments "
        "(every segment after the first scored). Peak memory: "
        f"{r0.get('memory_measure')}; it is what the step adds over the model and its inputs "
        "(gradients, activations, replay buffer, temporaries)."
    )
    title = "MRBP vs full BPTT vs segment-level checkpointing"
    return section(title, intro, head, body, "rollouts.png", "rollouts")


def _model(row: Row) -> str:
    """A measured model for a section's intro: its preset, parameter count and configuration."""
    return (
        f"Model `{row['size']}` ({row['parameters'] / 1e6:.1f}M parameters, "
        f"{_describe(row['config'])})"
    )


def _describe(config: dict[str, Any]) -> str:
    layers = (
        f"{config['n_encoder_layers']} encoder + {config['n_decoder_layers']} decoder layers"
        if config["architecture"] == "encoder-decoder"
        else f"{config['n_decoder_layers']} decoder-only layers"
    )
    return (
        f"d_model {config['d_model']}, {config['n_heads']} heads, d_ff {config['d_ff']}, "
        f"{layers}, {config['n_memory_slots']} slots, segment {config['segment_length']}, "
        f"vocabulary {config['vocab_size']}"
    )


def table3_section(rows: list[Row], out: Path) -> str | None:
    if not rows:
        return None
    rows = rollout_rows(rows)
    paper_bptt = next(r["paper_mb"] for r in rows if r["method"] == "bptt")
    r0 = rows[0]
    head = [
        "method",
        "peak MB",
        "memory vs BPTT",
        "speed vs BPTT",
        "paper MB",
        "paper memory vs BPTT",
        "paper speed",
    ]
    body = [
        [
            r["method"],
            fmt(r.get("peak_mb")),
            f"x{fmt(r['memory_ratio'], 2)}",
            f"x{fmt(r['speed'], 2)}",
            f"{r['paper_mb']:,}",
            f"x{r['paper_mb'] / paper_bptt:.2f}",
            f"x{r['paper_speed']:.2f}",
        ]
        for r in rows
    ]
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = range(len(rows))
    names = [r["method"] for r in rows]
    for ax, ours, paper, label in (
        (
            ax_mem,
            [r["memory_ratio"] or 0 for r in rows],
            [r["paper_mb"] / paper_bptt for r in rows],
            "peak memory / BPTT",
        ),
        (
            ax_speed,
            [r["speed"] or 0 for r in rows],
            [r["paper_speed"] for r in rows],
            "speed / BPTT",
        ),
    ):
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], paper, 0.4, label="paper")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Table 3 setting ({r0['size']}, T=4, batch {r0['batch']})")
    save_figure(fig, out / "table3.png")
    intro = (
        f"{_model(r0)}, horizon T=4, batch {r0['batch']}, all three methods measured in one "
        "run. The paper's column is its Table 3 (12-layer decoder, d_model 512, 8 heads, 32 "
        "slots, T=4, total GPU memory); compare the ratios."
    )
    return section("The paper's Table 3 setting", intro, head, body, "table3.png", "table 3")


def peer_section(rows: list[Row], out: Path) -> str | None:
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: (r["segments"], PEER_METHODS.index(r["method"])))
    r0 = rows[0]
    head = ["T", "run", "parameters", "ms / rollout", "tokens/s", "peak MB"]
    body = [
        [
            str(r["segments"]),
            PEER_LABELS[r["method"]],
            f"{r['parameters'] / 1e6:.2f}M",
            fmt(r["median_ms"]),
            fmt(r["tokens_per_s"]),
            fmt(r.get("peak_mb")),
        ]
        for r in rows
    ]
    segments = sorted({r["segments"] for r in rows})
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(PEER_METHODS)
    for i, method in enumerate(PEER_METHODS):
        mine = {r["segments"]: r for r in rows if r["method"] == method}
        xs = [j + i * width for j, t in enumerate(segments) if t in mine]
        ax_time.bar(xs, [mine[t]["median_ms"] for t in segments if t in mine], width, label=method)
        ax_mem.bar(
            xs, [mine[t].get("peak_mb") or 0 for t in segments if t in mine], width, label=method
        )
    for ax, label in ((ax_time, "ms / rollout"), (ax_mem, "peak MB")):
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(segments))], [f"T={t}" for t in segments]
        )
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"MRBP training step vs lucidrains/memformer ({r0['size']}, batch {r0['batch']})")
    save_figure(fig, out / "peer.png")
    intro = (
        f"Configuration `{r0['size']}` ({_describe(r0['config'])}), batch {r0['batch']}. "
        "Tokens/s counts the tokens the encoder reads per rollout."
    )
    title = "Against a peer: lucidrains' memformer 0.3.1"
    return f"{section(title, intro, head, body, 'peer.png', 'peer')}\n\n{PEER_DIFFERENCES}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json", type=Path, nargs="+", help="pytest-benchmark JSON files (--benchmark-json)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: the first JSON's)")
    args = parser.parse_args(argv)
    out = args.out or args.json[0].parent
    out.mkdir(parents=True, exist_ok=True)
    data = load(args.json)
    sections = [
        header(data, args.json, out),
        ops_section(suite(data, "ops"), out),
        model_section(suite(data, "model"), out),
        rollouts_section(suite(data, "rollout"), out),
        table3_section(suite(data, "table3"), out),
        peer_section(suite(data, "peer"), out),
    ]
    (out / "results.md").write_text("\n\n".join(s for s in sections if s) + "\n")
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
