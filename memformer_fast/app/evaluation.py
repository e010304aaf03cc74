"""What a trained byte-level model does on text: per-token negative log-likelihood, bits per byte
on held-out files with the memory carried and reset (by position in the file), and streaming
generation of bytes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..model import IGNORE_INDEX, Memformer
from ..validation import check_memory
from .data import PAD, RolloutInputs, align_documents, rollout_inputs
from .errors import UserError


@torch.no_grad()
def token_nll(
    model: Memformer,
    input_ids: Tensor,
    memory: Tensor | None = None,
    inputs: RolloutInputs | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The negative log-likelihood (nats) of every token of a rollout ``[B, N]`` given what
    precedes it, as ``sequence_loss`` scores it: ``(nll [B, N] float32, NaN where the token is
    not predicted, M_T)``. No gradient; ``progress(1)`` is called after each segment."""
    inputs = inputs or RolloutInputs()
    rollout = model.plan_rollout(
        input_ids, inputs.attention_mask, inputs.labels, resets=inputs.resets
    )
    memory = check_memory(model, memory, input_ids.shape[0])
    pieces = []
    for t in range(len(rollout)):
        logits, memory = model.rollout_logits(rollout, t, memory)
        targets = rollout.targets[t]
        if logits is None or targets is None:
            # the step's targets: the segment's successors (decoder), the next segment (enc-dec)
            nxt = t + 1 if model.is_encoder_decoder else t
            width = rollout.input_ids[nxt].shape[1] if nxt < len(rollout) else 0
            pieces.append(torch.full((input_ids.shape[0], width), math.nan, device=memory.device))
        else:
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
            )
            pieces.append(nll.masked_fill(targets == IGNORE_INDEX, math.nan))
        if progress is not None:
            progress(1)
    scored = torch.cat(pieces, dim=1)
    # Re-index by the predicted token: the decoder's position i predicts token i + 1; the
    # encoder-decoder's step t predicts segment t + 1, so the first segment is never predicted.
    skip = rollout.input_ids[0].shape[1] if model.is_encoder_decoder else 1
    head = scored.new_full((scored.shape[0], skip), math.nan)
    return torch.cat([head, scored[:, : input_ids.shape[1] - skip]], dim=1), memory


# Buckets of "segment index within the file" (1-based) for the position table: powers of four.
POSITION_BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, None))
CARRIED, RESET = "memory_carried", "memory_reset_every_segment"


def _pack_rows(documents: list[bytes], rows: int, segment_length: int) -> tuple[Tensor, Tensor]:
    """Documents aligned to segment starts and dealt into ``rows`` rows (longest first, each to
    the shortest row so far; deterministic), padded to one length: ``(tokens, offsets)``, both
    ``[rows, N]``, offsets -1 on padding."""
    order = sorted(range(len(documents)), key=lambda i: (-len(documents[i]), i))
    assigned: list[list[bytes]] = [[] for _ in range(rows)]
    lengths = [0] * rows
    for i in order:
        row = min(range(rows), key=lambda r: (lengths[r], r))
        assigned[row].append(documents[i])
        lengths[row] += -(-len(documents[i]) // segment_length) * segment_length
    laid = [align_documents(docs, segment_length) for docs in assigned if docs]
    width = max(len(t) for t, _ in laid)
    tokens = torch.zeros(len(laid), width, dtype=torch.long)
    offsets = torch.full((len(laid), width), PAD, dtype=torch.int32)
    for r, (t, o) in enumerate(laid):
        tokens[r, : len(t)], offsets[r, : len(o)] = t, o
    return tokens, offsets


@torch.no_grad()
def evaluate_documents(
    model: Memformer,
    documents: list[bytes],
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Bits per byte of ``model`` on held-out ``documents`` (each a file), twice: with the memory
    carried from segment to segment (restarting at each file's start) and with the memory reset
    before every segment; overall and by the index of the segment within its file
    (:data:`POSITION_BUCKETS`), so the gain of the memory can be read against the context it had.

    Both runs score exactly the same bytes: every byte but each file's first (decoder) or first
    segment (encoder-decoder), which a fresh run never predicts. Returns a JSON-ready dict.
    """
    from tqdm.auto import tqdm

    documents = [d for d in documents if d]
    if not documents:
        raise UserError("the held-out text is empty")
    L = model.config.segment_length
    if not model.is_encoder_decoder and all(len(d) == 1 for d in documents):
        raise UserError("every file holds one byte: there is nothing to predict")
    if model.is_encoder_decoder and all(len(d) <= L for d in documents):
        raise UserError(
            f"every file fits in one segment of {L} bytes: the encoder-decoder model predicts "
            "a file's second segment onwards, so there is nothing to score"
        )
    tokens, offsets = _pack_rows(documents, batch_size, L)
    tokens, offsets = tokens.to(model.device), offsets.to(model.device)
    was_training = model.training
    model.eval()
    nll: dict[str, Tensor] = {}
    bar = tqdm(
        total=2 * (tokens.shape[1] // L),
        unit="segment",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    try:
        for name, every in ((CARRIED, False), (RESET, True)):
            inputs = rollout_inputs(model, tokens, offsets, reset_every_segment=every)
            nll[name] = token_nll(model, tokens, None, inputs, bar.update)[0].cpu()
    finally:
        bar.close()
        model.train(was_training)
    scored = ~nll[CARRIED].isnan()
    position = offsets.cpu().long() // L + 1  # the predicted byte's segment within its file

    def bits(name: str, where: Tensor) -> float:
        return float(nll[name][where].double().sum()) / max(int(where.sum()), 1) / math.log(2)

    buckets = []
    for first, last in POSITION_BUCKETS:
        where = scored & (position >= first)
        if last is not None:
            where &= position <= last
        if bool(where.any()):
            label = str(first) if first == last else f"{first}-{last}" if last else f"{first}+"
            buckets.append(
                {
                    "segments": label,
                    "first": first,
                    "last": last,
                    "bytes": int(where.sum()),
                    CARRIED: bits(CARRIED, where),
                    RESET: bits(RESET, where),
                }
            )
    return {
        "files": len(documents),
        "bytes": sum(len(d) for d in documents),
        "predicted_bytes": int(scored.sum()),
        "segment_length": L,
        "bits_per_byte": {CARRIED: bits(CARRIED, scored), RESET: bits(RESET, scored)},
        "by_segment_in_file": buckets,
    }


def format_evaluation(report: dict[str, Any]) -> str:
    """The table ``memformer-fast eval`` prints for a report of :func:`evaluate_documents`."""
    rows = [("all segments", report["predicted_bytes"], *report["bits_per_byte"].values())]
    rows += [
        (f"segment{'' if b['first'] == b['last'] else 's'} {b['segments']}", b["bytes"],
         b[CARRIED], b[RESET])
        for b in report["by_segment_in_file"]
    ]  # fmt: skip
    lines = [
        f"{'position in the file':<22}{'bytes':>11}{'memory carried':>17}{'memory reset':>15}"
        f"{'memory gain':>20}"
    ]
    for label, n, carried, reset in rows:
        gain = reset - carried
        lines.append(
            f"{label:<22}{n:>11,}{carried:>17.3f}{reset:>15.3f}{gain:>+12.3f} ({gain / reset:+.1%})"
        )
    return "\n".join(lines) + (
        "\nbits per byte on held-out files; memory reset = the initial memory before every "
        "segment; gain = reset - carried"
    )


def stream_bytes(
    model: Memformer,
    prompt: bytes,
    max_bytes: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> Iterator[int]:
    """Generate ``max_bytes`` bytes after ``prompt``, one at a time, in constant memory."""
    if not prompt:
        raise UserError("the prompt must not be empty")
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    gen = torch.Generator(model.device).manual_seed(seed)
    for token in model.stream(ids, max_bytes, temperature=temperature, top_k=top_k, generator=gen):
        yield int(token[0])
