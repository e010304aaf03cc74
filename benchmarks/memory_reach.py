"""How far does the memory carry? Recall after up to 16,384 segments, and what the memory forgets.

One run trains a small Memformer on single-key recall exactly as ``memory_learning.py`` does (same
options, rollouts of at most 16 segments), then streams held-out sequences one segment at a time
(constant memory) and asks for the key after T = 8, 16, 64, 256, 1,024, 4,096 and 16,384 segments,
all from one stream: the query segment is decoded from a copy of the memory at each length.

Each probe sequence has a twin that differs only in its key, so the memory of the pair at
segment ``t`` differs only by what is left of the key: ``||M_t(key) - M_t(key')||``, taken on
the slot that differs most (the *key slot*), measures it directly. Per segment the trace logs, on
that slot: that signal, its gate ``g`` (mean over D), the memory bias's share of the update
``||bias|| / ||u||``, the cosine of the slot with its bias, and, at each length, the query's read
attention on it (mean over layers and heads).

    python benchmarks/memory_reach.py --arch decoder --d-model 64 --seed 0 \\
        --out benchmarks/results/memory_reach/defaults
    python benchmarks/memory_reach.py --report benchmarks/results/memory_reach
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from memory_learning import (
    TASK,
    _changes,
    _label,
    add_training_arguments,
    build_model,
    parse_run_arguments,
    pyplot,
    run_name,
    train,
    write_readme,
)
from torch import Tensor

from memformer_fast import functional
from memformer_fast.app.recall import FIRST_KEY, MARKER_TOKEN, RecallTask, recall_by_length
from memformer_fast.model import Memformer

# Each length and the odd one after it: a model trained on even rollouts only can learn a memory
# whose content alternates from one segment to the next and recall at even lengths alone.
REACH_LENGTHS = (8, 9, 16, 17, 64, 65, 256, 257, 1024, 1025, 4096, 4097, 16384, 16385)
PROBE_PAIRS = 128  # twins: 256 sequences per length


def _trace_points(longest: int) -> list[int]:
    """Segments at which the trace is kept: every one up to 32, then 16 per factor of 2."""
    points = set(range(1, min(32, longest) + 1))
    t = 32.0
    while t < longest:
        t *= 2 ** (1 / 16)
        points.add(min(longest, round(t)))
    return sorted(points)


@contextmanager
def _recorded_updates() -> Iterator[list[dict[str, Tensor]]]:
    """Record the arguments of every memory update and every memory read's attention
    probabilities. The layers validate once and call functional's unchecked twins
    (``_gated_memory_update``, ``_memory_read_attention``), so those are the ones recorded."""
    calls: list[dict[str, Tensor]] = []
    update, read = functional._gated_memory_update, functional._memory_read_attention

    def recording_update(memory, candidate, bias, gate_logits, *args):  # type: ignore[no-untyped-def]
        calls.append(dict(memory=memory, candidate=candidate, bias=bias, gate_logits=gate_logits))
        return update(memory, candidate, bias, gate_logits, *args)

    def recording_read(q, k, v, scale, *args):  # type: ignore[no-untyped-def]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        probs = torch.softmax(torch.einsum("blhd,bshd->blhs", q.float(), k.float()) * scale, -1)
        calls.append(dict(read=probs))  # [B, L, H, S]
        return read(q, k, v, scale, *args)

    functional._gated_memory_update = recording_update
    functional._memory_read_attention = recording_read
    try:
        yield calls
    finally:
        functional._gated_memory_update, functional._memory_read_attention = update, read


def _twins(task: RecallTask, pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(first segments [2P, L], keys [2P])``: rows ``i`` and ``P + i`` differ only in the key
    (the token after the marker)."""
    ids, _, keys = task.sample(pairs, 2, generator=generator)
    first = ids[:, : task.segment_length]
    shift = torch.randint(1, task.num_keys, keys.shape, generator=generator)
    other = FIRST_KEY + (keys - FIRST_KEY + shift) % task.num_keys
    twin = first.clone()
    twin[torch.arange(pairs), (first == MARKER_TOKEN).float().argmax(1) + 1] = other
    return torch.cat([first, twin]), torch.cat([keys, other])


def _content(task: RecallTask, rows: int, generator: torch.Generator) -> Tensor:
    """A distractor segment ``[rows, L]``, the same for both twins."""
    half = torch.randint(FIRST_KEY, task.vocab_size, (rows // 2, task.segment_length),
                         generator=generator)  # fmt: skip
    return torch.cat([half, half])


@torch.no_grad()
def stream_reach(
    model: Memformer,
    task: RecallTask,
    lengths: Sequence[int],
    pairs: int = PROBE_PAIRS,
    seed: int = 20_000,
) -> dict[str, Any]:
    """Recall at each of ``lengths`` from one stream of twins, and the trace of the key slot."""
    gen = torch.Generator().manual_seed(seed)
    first, keys = _twins(task, pairs, gen)
    points = set(_trace_points(max(lengths)))
    rows_ = torch.arange(pairs)
    state: dict[str, Any] = dict(key_slot=None, signal0=None, delta8=None)
    trace: list[dict[str, float]] = []
    read_on_key: list[float] = []

    def on_segment(t: int, memory: Tensor, new: Tensor, queried: bool) -> None:
        update = next(c for c in reversed(calls) if "gate_logits" in c)  # the segment's write
        if queried and state["key_slot"] is not None:
            # The query's reads come first: the answer's attention on the key slot (the decoder
            # reads with the query token itself, the encoder-decoder with the whole context).
            reads = [c["read"] for c in calls if "read" in c][: len(model.blocks)]
            at = slice(None) if model.is_encoder_decoder else slice(-2, -1)
            probs = torch.stack([r[:, at].mean((1, 2)) for r in reads]).mean(0)  # [2P, S]
            both = torch.cat([state["key_slot"], state["key_slot"]])
            read_on_key.append(float(probs.gather(1, both[:, None]).mean()))
        calls.clear()
        delta = (new[:pairs] - new[pairs:]).float()  # [P, S, D]: what the memory holds of the key
        diff = delta.norm(dim=-1)
        if t == 0:  # the key's segment: the slot it changed most holds it
            state["key_slot"] = diff.argmax(1)
        if t + 1 == 8:  # the reference direction: a length every run trains on
            state["delta8"] = delta.flatten(1)
        if t + 1 not in points:
            return
        slot = state["key_slot"]
        m = update["memory"][:pairs].float()[rows_, slot]
        c = update["candidate"][:pairs].float()[rows_, slot]
        b = update["bias"].float()[slot]
        logits = update["gate_logits"]
        g = torch.sigmoid(logits[:pairs].float()[rows_, slot]) if logits is not None else 1.0
        u = g * c + (1 - g) * m + b
        signal = diff[rows_, slot].mean()
        state["signal0"] = state["signal0"] if state["signal0"] is not None else signal
        turned = (
            float(torch.cosine_similarity(delta.flatten(1), state["delta8"], dim=-1).mean())
            if state["delta8"] is not None
            else float("nan")
        )
        trace.append(
            dict(
                segment=t + 1,
                key_signal=float(signal / state["signal0"]),
                gate=float(torch.as_tensor(g).mean()),
                bias_share=float((b.norm(dim=-1) / u.norm(dim=-1)).mean()),
                cos_bias=float(torch.cosine_similarity(new[:pairs][rows_, slot], b, -1).mean()),
                candidate_change=float((c - m).norm(dim=-1).mean()),
                # Has what the memory holds of the key turned since segment 8? The readout
                # learnt the directions of the rollouts it was trained on.
                key_direction_cos=turned,
            )
        )

    with _recorded_updates() as calls:
        accuracy = recall_by_length(
            model, task, lengths, generator=gen, first_segments=first, keys=keys,
            on_segment=on_segment, copies=2,
        )  # fmt: skip
    return dict(
        accuracy={str(k): v for k, v in accuracy.items()},
        read_on_key_slot=dict(zip(map(str, sorted(lengths)), read_on_key)),
        trace=trace,
        bias_norm_mean=float(model.writer.bias.detach().norm(dim=-1).mean()),
        sequences=len(keys),
    )


# Result folders under benchmarks/results/memory_reach/ and what each holds.
REACH_GROUPS = {
    "recipe": "the recipe: mixed rollout lengths (2 or 3 to 16), memory bias initialised at norm "
    "0.001, memory noise of norm 0.8 in training",
    "noise_level": "the recipe with another memory noise (1.2: every seed of both architectures)",
    "wide": "d_model 256, one seed per architecture: memory noise 1.2, AdamW beta2 0.95 and an "
    "extra stage of rollouts to 8 segments (the recipe's schedule at beta2 0.999 collapsed)",
    "without_noise": "the recipe without the memory noise",
    "ablations": "one change from the recipe without noise (or from the recipe before this work)",
}


def _reach_table(runs: list[dict[str, Any]]) -> list[str]:
    lengths = sorted({int(t) for r in runs for t in r["reach"]["accuracy"]})
    even = [t for t in lengths if t % 2 == 0]
    head = " | ".join(f"T={t:,}" for t in even)
    lines = [
        f"| arch | d_model | seed | changed | schedule | updates | {head} | worst odd T | "
        "learned bias norm |",
        "|---" * (len(even) + 8) + "|",
    ]
    for r in sorted(runs, key=lambda r: (r["arch"], r["d_model"], r["overrides"], r["seed"])):
        acc = {int(t): a for t, a in r["reach"]["accuracy"].items()}
        cells = " | ".join(f"{acc[t]:.1%}" if t in acc else "-" for t in even)
        odd = [a for t, a in acc.items() if t % 2]
        changed = ", ".join(_changes(r)) or "-"
        lines.append(
            f"| {r['arch']} | {r['d_model']} | {r['seed']} | {changed} | {r.get('schedule', '-')} "
            f"| {r.get('steps', '-')} | {cells} | {f'{min(odd):.1%}' if odd else '-'} | "
            f"{r['reach']['bias_norm_mean']:.3f} |"
        )
    return lines


def report(folder: Path) -> None:
    """``folder/README.md`` (a table per group) and ``folder/reach.png`` (recall against T)."""
    head = [
        "# Memory reach: single-key recall far beyond the trained length",
        "",
        f"Generated by `python benchmarks/memory_reach.py --report {folder}` from one JSON per run "
        "(training curve, recall per length, per-segment trace of the key slot). A run trains as "
        "`benchmarks/memory_learning.py` does (batch 64, AdamW 1e-3 x 64 / d_model, SpikeClip, "
        "rollouts of at most 16 segments, stopped once the T = 8 probe held >= 97% twice after "
        "`--min-final` updates of the last stage), then streams 128 pairs of held-out sequences "
        "(256 sequences; twins that differ only in the key) one segment at a time at constant "
        "memory, and asks for the key after each length T (and T + 1: a memory that alternates "
        "from one segment to the next fails there). Chance 12.5%.",
    ]
    groups = write_readme(folder, REACH_GROUPS, head, _reach_table)
    everything = [r for runs in groups.values() for r in runs]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, r in enumerate(everything):
        acc = sorted((int(t), a) for t, a in r["reach"]["accuracy"].items())
        style = dict(color=f"C{i % 10}", ls="-" if r["arch"] == "decoder" else "--", marker=".")
        label = _label(r)
        axes[0].plot(*zip(*acc), label=label, **style)
        trace = [(p["segment"], p["key_signal"]) for p in r["reach"]["trace"]]
        axes[1].plot(*zip(*trace), label=label, **style)
    axes[0].axhline(0.125, color="gray", ls=":", label="chance")
    axes[0].set(xscale="log", xlabel="segments after the key (T)", ylabel="recall",
                ylim=(0, 1.02), title="recall against T (trained on at most 16)")  # fmt: skip
    axes[1].set(xscale="log", xlabel="segment", ylabel="||M(key) - M(key')|| / at segment 1",
                title="what the key slot still holds of the key")  # fmt: skip
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(folder / "reach.png", dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--lengths", default=",".join(map(str, REACH_LENGTHS)))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_reach/defaults"))
    p.add_argument(
        "--save-model",
        type=Path,
        help="also save the trained weights (a .pt file; its training record beside it, .json)",
    )
    p.add_argument("--load-model", type=Path, help="evaluate these weights instead of training")
    args = parse_run_arguments(p, report)
    if args is None:
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.load_model:
        model = build_model(args)
        model.load_state_dict(torch.load(args.load_model))
        # The training record saved beside the weights, so the report can show how they were made.
        trained = args.load_model.with_suffix(".json")
        record: dict[str, Any] = (
            json.loads(trained.read_text())
            if trained.exists()
            else dict(arch=args.arch, d_model=args.d_model, seed=args.seed, overrides=args.set)
        )
        record["loaded"] = str(args.load_model)
        record["command"] = (
            f"{record['command']}; then: {command}" if "command" in record else command
        )
    else:
        record, model = train(args)
        record["command"] = command
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
        args.save_model.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    start = time.perf_counter()
    record["reach"] = stream_reach(model, TASK, lengths)
    record["reach"]["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{run_name(args)}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("reach", json.dumps(record["reach"]["accuracy"]), "->", path)


if __name__ == "__main__":
    main()
