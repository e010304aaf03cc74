"""What the memory buys on real text, against a no-memory model and a Transformer-XL cache.

Usage::

    python benchmarks/real_text.py              # the full run: 8 trainings, 2 at a time
    python benchmarks/real_text.py --smoke      # about a minute: checks the pipeline only
    make real-text                              # the full run

Two texts every machine with Python 3.10+ has, without a download, each a set of documents
split into training and held-out documents by a hash of their name:

- ``code``: the standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``, without
  its ``test`` and ``idlelib`` packages); one file in ten held out.
- ``prose``: the Python reference documentation the standard library ships for ``help()``
  (``pydoc_data.topics.topics``: one English document per topic, e.g. the data model, the
  ``import`` system, string formatting, up to 60 KB each); one topic in five held out. It is
  long-range: a section names and defines terms, methods and grammar productions once and refers
  back to them for pages.

Four byte-level models, all the same decoder Memformer blocks and parameters (width, layers,
slots; the memory reader and writer exist in all four, so the parameter count is identical), the
same steps and the same training bytes (each step ``batch`` rows x ``segments`` segments; every
document starts on a segment boundary and on its first segment the state is reset):

- ``memory``: the Memformer, trained with MRBP on rollouts of ``segments`` segments, its memory
  carried from rollout to rollout along each row and reset only where a document starts;
  ``memory_dropout`` (a share of segments started from the initial memory at random) and
  ``memory_noise`` in training. Also scored with its memory reset before every segment: what its
  memory is worth to it.
- ``no_memory``: the same model trained and evaluated with the memory reset before every segment.
- ``xl``: the same blocks, each attending also to a detached cache of the previous segment's keys
  and values (Transformer-XL style, rotary positions continuing across the two); the memory
  reader reads the constant initial memory. Defined here, not in the library.
- ``window``: a plain decoder (memory reset every segment) on segments twice as long; evaluated
  with a sliding window, each segment scored with the previous segment as context.

Each model is evaluated on the held-out documents from their start: bits per byte overall and by
the index of the segment within its document. ``results.json``, ``results.md`` and
``bpb_by_segment.png`` are written into ``--out`` with the commands, times and machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
PAD = 0  # byte 0 never occurs in either text; padded positions are never scored
IGNORE = -100
MODELS = ("memory", "xl", "no_memory", "window")
TEXTS = ("code", "prose")
BUCKETS = [(1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, None)]
LABELS = {
    "memory": "Memformer (memory carried)",
    "no_memory": "same model, memory reset every segment",
    "xl": "Transformer-XL cache (previous segment's K, V)",
    "window": "plain decoder, context 2 segments",
}
# The full run: a 4-layer decoder of width 128, 16 slots, segments of 64 bytes, 1,000 steps of 32
# rows x 4 segments (the same bytes per step as 8 x 16, from 4x as many places in the text: better
# for every model: benchmarks/results/real_text/explore300/); the memory model with memory_dropout.
FULL: dict[str, Any] = dict(
    d_model=128,
    n_heads=4,
    layers=4,
    slots=16,
    segment=64,
    batch_size=32,
    segments=4,
    memory_noise=0.0,
    write_rotary=False,
    memory_dropout=0.5,
    held_out_bytes=120_000,
    steps=1000,
)
SMOKE: dict[str, Any] = dict(
    d_model=32,
    n_heads=2,
    layers=1,
    slots=4,
    segment=32,
    batch_size=2,
    segments=4,
    memory_noise=0.8,
    write_rotary=False,
    memory_dropout=0.0,
    held_out_bytes=3_000,
    steps=3,
)
SKIP_DIRS = {"test", "site-packages", "dist-packages", "__pycache__", "idlelib"}


# ---------------------------------------------------------------------------------- the texts


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def documents(text: str) -> tuple[list[bytes], list[bytes], dict[str, Any]]:
    """(training documents, held-out documents, a description); each list in name-hash order
    (a fixed shuffle)."""
    named: dict[str, bytes] = {}
    if text == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            if rel.parts and rel.parts[0] in SKIP_DIRS:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and d[0] != ".")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    named[str(rel / f)] = (root / rel / f).read_bytes().replace(b"\0", b" ")
        source, every = str(root), 10
    elif text == "prose":
        from pydoc_data.topics import topics

        named = {k: v.encode().replace(b"\0", b" ") for k, v in topics.items()}
        source, every = "pydoc_data.topics.topics", 5
    else:
        raise ValueError(f"unknown text {text!r}")
    named = {k: v for k, v in named.items() if len(v) > 1}
    order = sorted(named, key=name_hash)
    train = [named[k] for k in order if name_hash(k) % every]
    held = [named[k] for k in order if not name_hash(k) % every]
    info = {
        "source": source,
        "held_out": f"1 in {every} documents by a hash of the name",
        "train_documents": len(train),
        "train_bytes": sum(map(len, train)),
        "held_out_documents": len(held),
        "held_out_bytes": sum(map(len, held)),
    }
    return train, held, info


def training_stream(docs: list[bytes], rows: int, segment: int, n_segments: int) -> Any:
    """``(ids, labels [rows, n_segments * segment], resets [rows, n_segments])``: the documents
    one after another, each starting on a boundary of two segments (padded), cut into ``rows``
    contiguous parts (repeated if ``rows * n_segments`` segments are more than there are).
    A label is the byte, or -100 for padding and a document's first byte (never predicted)."""
    import torch

    align = 2 * segment  # the window model's segments are two long: no window spans documents
    ids, labels, starts = bytearray(), [], []
    for doc in docs:
        starts.append(len(ids) // segment)
        padded = -(-len(doc) // align) * align
        ids += doc + bytes(padded - len(doc))
        labels += [IGNORE] + list(doc[1:]) + [IGNORE] * (padded - len(doc))
    total = len(ids) // segment
    reset = torch.zeros(total, dtype=torch.bool)
    reset[starts] = True
    ids_t = torch.frombuffer(ids, dtype=torch.uint8).long()
    labels_t = torch.tensor(labels, dtype=torch.long)
    repeats = -(-rows * n_segments // total)
    ids_t, labels_t, reset = ids_t.repeat(repeats), labels_t.repeat(repeats), reset.repeat(repeats)
    per_row = (repeats * total // rows) // 2 * 2
    need = rows * per_row
    ids_t = ids_t[: need * segment].view(rows, per_row * segment)[:, : n_segments * segment]
    labels_t = labels_t[: need * segment].view(rows, per_row * segment)[:, : n_segments * segment]
    reset = reset[:need].view(rows, per_row)[:, :n_segments].clone()
    reset[:, 0] = True
    labels_t = labels_t.clone()
    labels_t[:, 0] = IGNORE
    return ids_t.contiguous(), labels_t.contiguous(), reset


# ---------------------------------------------------------------------------------- the models


def make_model(cfg: dict[str, Any], kind: str) -> Any:
    from memformer_fast import Memformer, MemformerConfig

    config = MemformerConfig(
        vocab_size=256, d_model=cfg["d_model"], n_heads=cfg["n_heads"], d_ff=4 * cfg["d_model"],
        n_decoder_layers=cfg["layers"], n_memory_slots=cfg["slots"],
        segment_length=cfg["segment"] * (2 if kind == "window" else 1), architecture="decoder",
        memory_noise=cfg["memory_noise"] if kind == "memory" else 0.0,
        write_rotary=cfg["write_rotary"],
    )  # fmt: skip
    return Memformer(config)


def xl_segment(model: Any, ids: Any, cache: list[Any] | None, keep: Any) -> tuple[Any, list[Any]]:
    """One segment of the Transformer-XL baseline, built of the Memformer's own blocks: each
    block's self-attention also sees the previous segment's keys and values (``cache``: per block
    the detached ``[B, L, 3, H, Dh]`` projections before the rotation, rotated here with the
    positions ``0 .. 2L``), except in the rows where ``keep [B]`` is False (a new document).
    The memory reader reads the constant initial memory. Returns ``(logits [B, L, V], cache)``."""
    import torch
    import torch.nn.functional as F

    from memformer_fast.layers import apply_rotary

    batch, length = ids.shape
    h = model.embed(ids)
    m0 = model.init_memory(batch)
    new_cache = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.qkv(block.attn_norm(h)).unflatten(-1, (3, attn.n_heads, -1))
        new_cache.append(qkv.detach())
        if cache is None:
            cos, sin = attn._rotary_tables(0, length, qkv.dtype)
            q, k, v = (t.transpose(1, 2) for t in apply_rotary(qkv, cos, sin).unbind(2))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            both = torch.cat([cache[i], qkv], 1)
            cos, sin = attn._rotary_tables(0, both.shape[1], qkv.dtype)
            q, k, v = (t.transpose(1, 2) for t in apply_rotary(both, cos, sin).unbind(2))
            past = cache[i].shape[1]
            mask = torch.ones(length, past + length, dtype=torch.bool).tril(past)
            mask = mask.expand(batch, 1, length, past + length).clone()
            mask[:, :, :, :past] &= keep[:, None, None, None]
            o = F.scaled_dot_product_attention(q[:, :, past:], k, v, attn_mask=mask)
        h = h + attn.out(o.transpose(1, 2).flatten(2))
        h = h + block.reader(h, m0)
        h = h + block.ff(block.ff_norm(h))
    return model.lm_head(model.norm(h)), new_cache


# ---------------------------------------------------------------------------------- training


def drop_memory(resets: Any, share: float, generator: Any) -> Any:
    """``resets [B, T]`` with, besides the document starts, about ``share`` of the segments
    starting from the initial memory, drawn from ``generator`` (``memory_dropout``, training
    only): the model must also predict without what it wrote, so it cannot lean on its memory
    for what the segment itself shows."""
    import torch

    return resets | (torch.rand(resets.shape, generator=generator) < share)


def train(model: Any, kind: str, cfg: dict[str, Any], stream: Any, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from memformer_fast import SpikeClip, mrbp

    ids, labels, resets = stream
    seg, n = cfg["segment"], cfg["segments"]
    lr = 1e-3 * 64 / cfg["d_model"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))),
    )
    clip = SpikeClip()
    dropped = torch.Generator().manual_seed(0)
    memory, cache, losses, norms, clipped = None, None, [], [], 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        cols = slice(step * n * seg, (step + 1) * n * seg)
        x, y, r = ids[:, cols], labels[:, cols], resets[:, step * n : (step + 1) * n]
        if kind == "memory":
            r = drop_memory(r, cfg["memory_dropout"], dropped)
            result = mrbp.backward(model, x, memory, labels=y, resets=r)
            memory, loss = result.memory, float(result.loss)
        elif kind in ("no_memory", "window"):
            every = torch.ones(x.shape[0], -(-x.shape[1] // model.config.segment_length))
            # No state crosses a segment: plain backprop gives MRBP's gradients, without its
            # extra forward pass along the critical path.
            rollout_loss, _ = model.sequence_loss(x, None, labels=y, resets=every.bool())
            rollout_loss.backward()
            loss = float(rollout_loss.detach())
        else:  # xl: segment by segment, the cache detached; one loss over the rollout
            count = int((y[:, 1:] != IGNORE).sum().clamp(min=1))
            total = 0.0
            for t in range(n):
                logits, cache = xl_segment(model, x[:, t * seg : (t + 1) * seg], cache, ~r[:, t])
                target = y[:, t * seg + 1 : (t + 1) * seg + 1]
                part = F.cross_entropy(
                    logits[:, : target.shape[1]].flatten(0, 1),
                    target.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
                (part / count).backward()
                total += float(part.detach())
            loss = total / count
        limit = clip.limit
        norms.append(float(clip(model.parameters())))
        clipped += norms[-1] > limit
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 1),
        "tokens": steps * ids.shape[0] * n * seg,
        "tokens_per_second": round(steps * ids.shape[0] * n * seg / seconds, 1),
        "final_loss_nats": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        # How hard the clipping held the model back: the share of steps clipped, and the norms.
        "clipped_share": round(clipped / steps, 3),
        "grad_norm_median": round(sorted(norms)[len(norms) // 2], 3),
        "grad_norm_max": round(max(norms), 3),
    }


# ---------------------------------------------------------------------------------- evaluation


def evaluate(model: Any, kind: str, cfg: dict[str, Any], docs: list[bytes]) -> dict[str, Any]:
    """Bits per byte on ``docs``, each read from its start, per segment index within it."""
    import torch
    import torch.nn.functional as F

    seg = cfg["segment"]
    model.eval()
    order = sorted(docs, key=len, reverse=True)
    nats: list[float] = []
    counts: list[int] = []
    late_nats = torch.zeros(seg, dtype=torch.float64)
    late_counts = torch.zeros(seg, dtype=torch.long)
    start = time.perf_counter()
    batch = 16
    with torch.inference_mode():
        for first in range(0, len(order), batch):
            group = order[first : first + batch]
            n_seg = -(-len(group[0]) // seg)
            ids = torch.zeros(len(group), n_seg * seg, dtype=torch.long)
            labels = torch.full_like(ids, IGNORE)
            for b, doc in enumerate(group):
                row = torch.frombuffer(bytearray(doc), dtype=torch.uint8).long()
                ids[b, : len(doc)] = row
                labels[b, 1 : len(doc)] = row[1:]
            lengths = torch.tensor([len(d) for d in group])
            state: Any = None
            last = None
            for t in range(n_seg):
                rows = int((lengths > t * seg).sum())  # the documents still going (a prefix)
                x = ids[:rows, t * seg : (t + 1) * seg]
                if kind == "memory":
                    out = model(x, memory=None if state is None else state[:rows])
                    logits, state = out.logits, out.memory
                elif kind == "no_memory":
                    logits = model(x).logits
                elif kind == "window":
                    prev = ids[:rows, max(0, t - 1) * seg : t * seg]
                    logits = model(torch.cat([prev, x], 1)).logits[:, prev.shape[1] :]
                else:
                    keep = torch.ones(rows, dtype=torch.bool)
                    cache = None if state is None else [c[:rows] for c in state]
                    logits, state = xl_segment(model, x, cache, keep)
                scores = (
                    logits[:, :-1] if last is None else torch.cat([last[:rows], logits[:, :-1]], 1)
                )
                target = labels[:rows, t * seg + (1 if last is None else 0) : (t + 1) * seg]
                nll = F.cross_entropy(
                    scores.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                    reduction="none",
                ).view(target.shape)  # fmt: skip
                while len(nats) <= t:
                    nats.append(0.0)
                    counts.append(0)
                nats[t] += float(nll.sum())
                counts[t] += int((target != IGNORE).sum())
                if t >= 16:  # segments 17+: where in the segment each model gains or loses
                    first = seg - target.shape[1]
                    late_nats[first:] += nll.sum(0).double()
                    late_counts[first:] += (target != IGNORE).sum(0)
                last = logits[:, -1:]
    seconds = time.perf_counter() - start
    scored = sum(counts)
    bits = 1 / math.log(2)

    def bpb(lo: int, hi: int | None) -> tuple[float | None, int]:
        n = sum(counts[lo - 1 : hi])
        return (round(sum(nats[lo - 1 : hi]) * bits / n, 4) if n else None), n

    buckets = []
    for lo, hi in BUCKETS:
        value, n = bpb(lo, hi)
        name = str(lo) if hi == lo else (f"{lo}-{hi}" if hi else f"{lo}+")
        buckets.append({"segments": name, "bits_per_byte": value, "bytes": n})
    # Segments 17+ by where a byte sits in its segment, in eighths: the first eighth is where
    # the previous segment's bytes matter most.
    eighths = zip((late_nats * bits).split(seg // 8), late_counts.split(seg // 8), strict=True)
    by_position = [round(float(n.sum()) / max(1, int(c.sum())), 4) for n, c in eighths]
    return {
        "bits_per_byte": round(sum(nats) * bits / scored, 4),
        "bits_per_byte_17_plus": bpb(17, None)[0],
        "bits_per_byte_17_plus_by_eighth_of_segment": by_position,
        "by_segment": buckets,
        "per_segment": {"nats": [round(v, 3) for v in nats], "bytes": counts},
        "documents": len(docs),
        "bytes": sum(map(len, docs)),
        "scored_bytes": scored,
        "seconds": round(seconds, 1),
        "tokens_per_second": round(sum(map(len, docs)) / seconds, 1),
    }


def state_size(cfg: dict[str, Any], kind: str) -> dict[str, Any]:
    """The state a sequence carries from segment to segment, in numbers (float32: 4 bytes)."""
    d, layers, seg = cfg["d_model"], cfg["layers"], cfg["segment"]
    if kind == "memory":
        return {"floats": cfg["slots"] * d, "what": f"{cfg['slots']} x {d} memory slots"}
    if kind == "xl":
        return {"floats": layers * seg * 2 * d, "what": f"{layers} layers x {seg} x 2 x {d} K, V"}
    if kind == "window":
        return {"floats": 0, "what": f"the previous {seg} bytes, recomputed"}
    return {"floats": 0, "what": "none"}


def run_job(text: str, kind: str, cfg: dict[str, Any], out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_docs, held, info = documents(text)
    model = make_model(cfg, kind)
    steps = cfg["steps"]
    stream = training_stream(train_docs, cfg["batch_size"], cfg["segment"], steps * cfg["segments"])
    print(f"{text}/{kind}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    trained = train(model, kind, cfg, stream, steps)
    held_out, size = [], 0
    for doc in held:  # the first held_out_bytes bytes of the held-out documents
        if size >= cfg["held_out_bytes"]:
            break
        held_out.append(doc[: cfg["held_out_bytes"] - size])
        size += len(held_out[-1])
    evaluated = evaluate(model, kind, cfg, held_out)
    if kind == "memory":  # what its memory is worth to it: the same weights, memory reset
        evaluated["memory_reset"] = evaluate(model, "no_memory", cfg, held_out)
    result = {
        "text": text,
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "state": state_size(cfg, kind),
        "train": trained,
        "eval": evaluated,
        "data": info,
        "training_passes": round(trained["tokens"] / info["train_bytes"], 2),
    }
    (out / f"{text}_{kind}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{text}/{kind}: {evaluated['bits_per_byte']} bpb overall", flush=True)


# ---------------------------------------------------------------------------------- the report


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
    }


def _clipped(trained: dict[str, Any]) -> str:
    """The share of steps the clipping cut, and the median gradient norm (runs before these were
    recorded: -)."""
    if "clipped_share" not in trained:
        return "-"
    return f"{trained['clipped_share']:.0%} (median norm {trained['grad_norm_median']:.2f})"


def markdown(results: dict[str, Any]) -> str:
    s, m = results["settings"], results["machine"]
    names = [b["segments"] for b in next(iter(results["runs"].values()))["eval"]["by_segment"]]
    lines = [
        "# Memformer against a no-memory model and a Transformer-XL cache on real text",
        "",
        f"Byte-level decoders of width {s['d_model']}, {s['layers']} layers, {s['slots']} memory "
        f"slots, segments of {s['segment']} bytes; every model the same blocks and parameters, "
        f"{s['steps']} steps of batch {s['batch_size']} x {s['segments']} segments (the same "
        f"bytes), AdamW at 1e-3 * 64 / d_model = {1e-3 * 64 / s['d_model']:g} (10% warm-up, "
        "cosine to 10%), SpikeClip; the memory model: MRBP rollouts of "
        f"{s['segments']} segments, memory carried along each row and reset at document starts, "
        f"memory_noise {s['memory_noise']}, memory_dropout {s.get('memory_dropout', 0.0)}, "
        f"write_rotary {s.get('write_rotary', False)}. Bits per byte (lower is better) on held-out "
        "documents read from their start, overall and by the index of the segment within the "
        "document.",
        "",
    ]
    for text in results["texts"]:
        runs = [results["runs"][f"{text}_{k}"] for k in results["models"]]
        info = runs[0]["data"]
        lines += [
            f"## {text}: {info['source']}",
            "",
            f"{info['train_documents']} training documents ({info['train_bytes']:,} bytes, "
            f"{runs[0]['training_passes']} passes in training), {info['held_out_documents']} "
            f"held out ({info['held_out']}); scored: {runs[0]['eval']['scored_bytes']:,} bytes of "
            f"{runs[0]['eval']['documents']} documents.",
            "",
            "| model | parameters | state per sequence (floats) | all | "
            + " | ".join(names)
            + " | train tokens/s | eval tokens/s | train min | steps clipped |",
            "|" + "---|" * (8 + len(names)),
        ]
        for r in runs:
            cells = [f"{r['eval']['bits_per_byte']:.3f}"] + [
                "-" if b["bits_per_byte"] is None else f"{b['bits_per_byte']:.3f}"
                for b in r["eval"]["by_segment"]
            ]
            lines.append(
                f"| {LABELS[r['model']]} | {r['parameters']:,} | {r['state']['floats']:,} "
                f"({r['state']['what']}) | " + " | ".join(cells) + f" | "
                f"{r['train']['tokens_per_second']:,.0f} | {r['eval']['tokens_per_second']:,.0f} "
                f"| {r['train']['seconds'] / 60:.1f} | {_clipped(r['train'])} |"
            )
        counts = [runs[0]["eval"]["scored_bytes"]] + [
            b["bytes"] for b in runs[0]["eval"]["by_segment"]
        ]
        lines.append("| bytes scored | | | " + " | ".join(f"{c:,}" for c in counts) + " | | | | |")
        lines.append("")
        eighths = [r for r in runs if "bits_per_byte_17_plus_by_eighth_of_segment" in r["eval"]]
        if eighths:
            lines += [
                "Segments 17+ by where a byte sits in its segment (eighths of "
                f"{s['segment']} bytes; the first eighth is where the previous segment matters "
                "most):",
                "",
                "| model | " + " | ".join(f"{i}/8" for i in range(1, 9)) + " |",
                "|" + "---|" * 9,
            ]
            for r in eighths:
                values = r["eval"]["bits_per_byte_17_plus_by_eighth_of_segment"]
                cells = " | ".join(f"{v:.3f}" for v in values)
                lines.append(f"| {LABELS[r['model']]} | {cells} |")
            lines.append("")
        memory_run = results["runs"].get(f"{text}_memory", {})
        reset = memory_run.get("eval", {}).get("memory_reset")
        if reset:
            carried = memory_run["eval"]["bits_per_byte_17_plus"]
            lines += [
                f"The Memformer's weights with its memory reset before every segment: "
                f"{reset['bits_per_byte_17_plus']:.3f} at segments 17+ against {carried:.3f} "
                f"with it carried (its memory is worth "
                f"{100 * (1 - carried / reset['bits_per_byte_17_plus']):.1f}% to it).",
                "",
            ]
        verdict = results["verdict"][text]
        lines += [
            f"Segments 17+: memory {verdict['memory']:.3f}, no memory {verdict['no_memory']:.3f} "
            f"({verdict['gain_vs_no_memory_percent']:+.1f}%: the target is at least 3% below), "
            f"Transformer-XL {verdict['xl']:.3f} (target: no worse): "
            f"{'met' if verdict['met'] else 'not met'}.",
            "",
        ]
    lines += [
        "![bits per byte by segment index](bpb_by_segment.png)",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}; {results['date']}. Each model trains in its own process with one "
        f"thread, {results['parallel']} processes at a time (train minutes are wall time under "
        "that load).",
        "- Reproduce: `" + results["script"] + "`; each job it runs is:",
        "",
        "```bash",
        *results["commands"],
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = results["texts"]
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.2), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        for kind in results["models"]:
            per = results["runs"][f"{text}_{kind}"]["eval"]["per_segment"]
            xs, ys, lo = [], [], 1
            while lo <= len(per["bytes"]):  # bins of whole powers of two: 1, 2, 3-4, 5-8, ...
                hi = min(2 * lo if lo > 1 else 1, len(per["bytes"]))
                if lo == 2:
                    hi = 2
                n = sum(per["bytes"][lo - 1 : hi])
                if n:
                    xs.append(math.sqrt(lo * hi))
                    ys.append(sum(per["nats"][lo - 1 : hi]) / n / math.log(2))
                lo = hi + 1
            ax.plot(xs, ys, marker="o", label=LABELS[kind])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segment index within the document")
        ax.set_ylabel("bits per byte (held out)")
        ax.set_title(text)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a quick check of the pipeline")
    parser.add_argument("--steps", type=int, help="training steps per model")
    parser.add_argument("--texts", default=",".join(TEXTS), help="comma-separated: code,prose")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--parallel", type=int, default=2, help="jobs at a time (1 thread each)")
    parser.add_argument("--out", help="results folder (default benchmarks/results/real_text)")
    parser.add_argument(
        "--memory-noise",
        type=float,
        help="the memory model's memory_noise in training (default 0)",
    )
    parser.add_argument(
        "--write-rotary",
        action="store_true",
        help="MemformerConfig.write_rotary: the writer attends to the segment by recency",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (slots, segments, batch_size, ...; JSON values)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the jobs' JSON"
    )
    parser.add_argument("--job", nargs=2, metavar=("TEXT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg: dict[str, Any] = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    if args.memory_noise is not None:
        cfg["memory_noise"] = args.memory_noise
    cfg["write_rotary"] = args.write_rotary
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            parser.error(f"--set {item}: unknown setting {key!r}; known: {sorted(cfg)}")
        cfg[key] = json.loads(value)
    default_out = "runs/real_text_smoke" if args.smoke else ROOT / "benchmarks/results/real_text"
    out = Path(os.path.relpath(Path(args.out) if args.out else default_out))
    out.mkdir(parents=True, exist_ok=True)
    if args.job:
        run_job(args.job[0], args.job[1], cfg, out)
        return
    texts, models = args.texts.split(","), args.models.split(",")
    common = ["--steps", str(cfg["steps"]), "--out", str(out)] + (["--smoke"] if args.smoke else [])
    if args.memory_noise is not None:
        common += ["--memory-noise", str(args.memory_noise)]
    if args.write_rotary:
        common.append("--write-rotary")
    for item in args.set:
        common += ["--set", item]
    jobs = {
        f"{t}_{k}": [sys.executable, __file__, "--job", t, k, *common]
        for k in models
        for t in texts
    }
    running: dict[str, tuple[Any, Any]] = {}
    pending = [] if args.report_only else list(jobs)
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            print("$", shlex.join(jobs[name]), flush=True)
            log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed below)
            running[name] = (
                subprocess.Popen(jobs[name], stdout=log, stderr=subprocess.STDOUT),
                log,
            )
        time.sleep(0.2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode:
                    sys.exit(f"{name} failed ({proc.returncode}); see {out / (name + '.log')}")
                print(f"{name}: done at {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    # A model whose jobs did not finish (--report-only after a cut-short run) is left out.
    models = [k for k in models if all((out / f"{t}_{k}.json").exists() for t in texts)]
    runs = {
        f"{t}_{k}": json.loads((out / f"{t}_{k}.json").read_text()) for k in models for t in texts
    }
    verdict = {}
    for t in texts:
        late = {k: runs[f"{t}_{k}"]["eval"]["bits_per_byte_17_plus"] for k in models}
        if all(late.get(k) is not None for k in ("memory", "no_memory", "xl")):
            gain = 100 * (late["memory"] / late["no_memory"] - 1)
            verdict[t] = {
                **late,
                "gain_vs_no_memory_percent": round(gain, 2),
                "met": gain <= -3 and late["memory"] <= late["xl"],
            }
    script = shlex.join(["python", "benchmarks/real_text.py", *sys.argv[1:]])
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "script": script,
        "settings": cfg,
        "texts": texts,
        "models": models,
        "parallel": args.parallel,
        "machine": machine(),
        "commands": [
            shlex.join(["python", "benchmarks/real_text.py", *c[2:]]) for c in jobs.values()
        ],
        "verdict": verdict,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if len(verdict) == len(texts):
        (out / "results.md").write_text(markdown(results))
    plot(results, out / "bpb_by_segment.png")
    print(f"\nwrote {out / 'results.md'}, results.json and bpb_by_segment.png\n")
    if len(verdict) == len(texts):
        print(markdown(results))


if __name__ == "__main__":
    main()
