"""Rollouts: a sequence ``[B, T*L]`` cut into segments, each segment's step, and full BPTT.

:func:`plan_rollout` validates a rollout once and cuts it into segments with their targets;
:func:`run_segment` is the segment step, the only one: :func:`rollout_logits` and
:func:`rollout_step` run it eagerly, :mod:`memformer_fast.compiled` runs it with compiled parts;
and :func:`sequence_loss` chains the steps with back-propagation through time, the ground truth
that :func:`memformer_fast.mrbp.backward` reproduces. The :class:`~memformer_fast.Memformer`
methods of the same names delegate here, one way: nothing here calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from . import randomness
from .validation import (
    IGNORE_INDEX,
    HostReads,
    check_ids,
    check_labels,
    check_memory,
    check_resets,
    mask_format,
)

if TYPE_CHECKING:  # type hints only: the model imports this module
    from .model import Memformer


@dataclass
class Rollout:
    """A rollout ``[B, T*L]`` cut into segments, with what each segment's loss needs.

    ``targets[t]`` are the labels scored on step ``t`` (None when all are ignored: no decoder
    work), ``num_targets`` the count over the whole rollout (each step's loss is a sum divided by
    it, so the per-step losses add up to the rollout's mean), ``seed`` the dropout seed or None.
    ``resets[t]`` is the ``[B]`` bool column of rows whose memory restarts from the initial memory
    before step ``t`` (None when no row resets there: no work at all).
    """

    input_ids: list[Tensor]
    masks: list[Tensor | None]
    targets: list[Tensor | None]
    decoder_inputs: list[Tensor | None]
    decoder_masks: list[Tensor | None]
    num_targets: int
    seed: int | None
    resets: list[Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def shift_right(
    ids: Tensor, mask: Tensor | None, bos_token_id: int
) -> tuple[Tensor, Tensor | None]:
    """Teacher forcing: ``[BOS, ids[:-1]]`` (``[B, L]``) and the matching mask (BOS is real)."""
    bos = ids.new_full((ids.shape[0], 1), bos_token_id)
    shifted = torch.cat([bos, ids[:, :-1].clamp_min(0)], dim=1)
    if mask is None:
        return shifted, None
    return shifted, torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], dim=1)


def upcast(logits: Tensor) -> Tensor:
    """Cross-entropy in at least float32 (float64 stays float64)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _scored_labels(model: Memformer, labels: Tensor) -> Tensor:
    """``[B, T*L]``: the labels the steps score, cut like the input. The encoder-decoder's step
    ``t`` scores segment ``t + 1`` (the last step none); the decoder's scores its own segment
    shifted by one token (the last token scores nothing)."""
    if model.is_encoder_decoder:
        return labels
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)


def _step_inputs(
    model: Memformer, ids: list[Tensor], masks: list[Tensor | None], scored: Tensor
) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
    """Per step: the labels it scores, the decoder's inputs and their masks (encoder-decoder)."""
    L = model.config.segment_length
    step_labels: list[Tensor | None] = list(scored.split(L, dim=1))
    if not model.is_encoder_decoder:
        return step_labels, [None] * len(ids), [None] * len(ids)
    bos = model.config.bos_token_id
    shifted = [shift_right(i, m, bos) for i, m in zip(ids[1:], masks[1:])] + [(None, None)]
    return [*step_labels[1:], None], [s[0] for s in shifted], [s[1] for s in shifted]


def _segment_counts(scored: Tensor, L: int) -> Tensor:
    """``[T]``: how many labels of each segment of ``L`` columns are scored (not -100), in a
    number of operators that does not depend on ``T`` (the last segment may be shorter)."""
    valid = scored != IGNORE_INDEX
    pad = -scored.shape[1] % L
    if pad:
        valid = F.pad(valid, (0, pad))
    return valid.view(valid.shape[0], -1, L).sum((0, 2))


def plan_rollout(
    model: Memformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    resets: Tensor | None = None,
) -> Rollout:
    """Validate a rollout ``[B, T*L]`` and cut it into segments with their targets
    (``Memformer.plan_rollout``).

    Decoder: step ``t`` predicts each token's successor (the last token of a segment predicts
    the first of the next). Encoder-decoder: step ``t`` decodes segment ``t + 1``, so the first
    segment is context only. Padded positions (``attention_mask == 0``) and labels equal to -100
    are not scored. ``resets [B, T]`` (bool, ``T = ceil(len / segment_length)``): row ``b``
    restarts from the initial memory before segment ``t`` where ``resets[b, t]``; it changes the
    memory only, not which tokens are scored.

    Everything the host needs from the values (the id range, the labels' validity, whether the
    mask hides anything, each segment's target count, which segments reset a row, and the
    rollout's dropout seed) is read with one host read (:class:`HostReads`); on bad input nothing
    has changed, the global generator included.
    """
    reads = HostReads(model.device)
    input_ids = check_ids(model, "input_ids", input_ids, reads=reads)
    mask = mask_format("attention_mask", attention_mask, input_ids)
    L = model.config.segment_length
    num_segments = -(-input_ids.shape[1] // L)
    resets = check_resets(
        model,
        "resets",
        resets,
        [input_ids.shape[0], num_segments],
        f"[B, T] (one flag per segment of segment_length={L})",
    )
    labels = input_ids if labels is None else check_labels(model, labels, input_ids, reads)
    if mask is not None:
        labels = labels.masked_fill(~mask, IGNORE_INDEX)
    scored = _scored_labels(model, labels)
    parts = {"counts": reads.add(_segment_counts(scored, L))}
    if mask is not None:
        parts["mask_all"] = reads.add(mask.all())
    if resets is not None:
        parts["resets_any"] = reads.add(resets.any(0))
    generator = torch.default_generator.get_state()
    if model.training and model.config.stochastic:
        parts["seed"] = reads.add(randomness.rollout_seed_tensor())
    try:
        values = reads.read()
        counts = values[parts["counts"]]
        if model.is_encoder_decoder:
            counts = [*counts[1:], 0]  # step t scores segment t + 1
        if sum(counts) == 0:
            reason = "every label is ignored or padded"
            if model.is_encoder_decoder and num_segments < 2:
                reason = "the encoder-decoder model predicts segment t + 1: it needs two segments"
            raise ValueError(f"the rollout has no token to predict: {reason}")
    except BaseException:
        torch.default_generator.set_state(generator)  # the seed's draw did not happen
        raise
    if mask is not None and values[parts["mask_all"]][0]:
        mask = None  # every token is real: no mask at all, as if none was given
    ids = list(input_ids.split(L, dim=1))
    masks: list[Tensor | None] = (
        list(mask.split(L, dim=1)) if mask is not None else [None] * len(ids)
    )
    step_labels, decoder_inputs, decoder_masks = _step_inputs(model, ids, masks, scored)
    targets = [t if n > 0 else None for t, n in zip(step_labels, counts)]
    seed = values[parts["seed"]][0] if "seed" in parts else None
    columns: list[Tensor | None] | None = None
    if resets is not None:
        any_reset = values[parts["resets_any"]]
        columns = [resets[:, t] if any_reset[t] else None for t in range(num_segments)]
    return Rollout(ids, masks, targets, decoder_inputs, decoder_masks, sum(counts), seed, columns)


def encode(
    model: Memformer, ids: Tensor, memory: Tensor, mask: Tensor | None, reset: Tensor | None,
    with_context: bool, with_memory: bool = True,
) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """One segment's critical path from ``memory [B, S, D]`` (the rows where ``reset [B]`` is True
    from the initial memory): ``(context [B, L, D] or None, M_{t+1} [B, S, D] or None)``.

    Without ``with_context`` (the critical-path pass) the last norm, which only the decoder
    reads, does not run; without ``with_memory`` (a replayed segment whose next memory gets no
    gradient) the writer does not run.
    """
    if reset is not None:
        memory = model.reset_memory(memory, reset)
    if not with_context:
        h = model._run_blocks(ids, memory, mask)
        return None, model.writer(memory, h, mask, validate=False)
    if not with_memory:
        return model.norm(model._run_blocks(ids, memory, mask)), None
    return model.read_segment(ids, memory, mask)


def decode_logits(
    model: Memformer, decoder_inputs: Tensor | None, context: Tensor, mask: Tensor | None,
    decoder_mask: Tensor | None, targets: Tensor,
) -> Tensor:  # fmt: skip
    """One segment's logits ``[B, L', V]``, aligned with ``targets [B, L']``, from its context."""
    return model.decode(decoder_inputs, context, mask, decoder_mask)


def decode_loss(
    model: Memformer, decoder_inputs: Tensor | None, context: Tensor, mask: Tensor | None,
    decoder_mask: Tensor | None, targets: Tensor,
) -> Tensor:  # fmt: skip
    """The summed cross-entropy of one segment's ``targets [B, L']``, from its context."""
    return summed_loss(model.decode(decoder_inputs, context, mask, decoder_mask), targets)


def run_segment(
    model: Memformer,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    *,
    head: Callable[..., Tensor] = decode_loss,
    critical: Callable[..., tuple[Tensor | None, Tensor | None]] = encode,
    with_head: bool = True,
    with_memory: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The segment step, the one every path runs (BPTT, eager and compiled MRBP, the rollout
    methods): segment ``t`` of ``rollout`` from ``memory`` -> ``(head's output or None,
    M_{t+1} or None)``.

    ``critical`` runs the encoder and writer (signature of :func:`encode`) and ``head`` the
    decoder (signature of :func:`decode_loss`); the compiled step passes compiled graphs of these
    functions. Each part runs under its own seed derived from ``seed``
    (:func:`randomness.part_seed`), so the masks do not depend on which parts run. The head runs
    only with ``with_head`` and targets to score; without ``with_memory`` the writer is skipped
    when the head runs (the critical-path pass always writes).
    """
    reset = None if rollout.resets is None else rollout.resets[t]
    targets, mask = rollout.targets[t], rollout.masks[t]
    decode = with_head and targets is not None
    with randomness.seeded(randomness.part_seed(seed, randomness.ENCODER), model.device):
        context, new_memory = critical(
            model, rollout.input_ids[t], memory, mask, reset, decode, with_memory or not decode
        )
    if not decode:
        return None, new_memory
    with randomness.seeded(randomness.part_seed(seed, randomness.DECODER), model.device):
        out = head(
            model, rollout.decoder_inputs[t], context, mask, rollout.decoder_masks[t], targets
        )
    return out, new_memory


def rollout_logits(
    model: Memformer,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    with_logits: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Segment ``t`` of a rollout: ``(logits of its targets or None, M_{t+1})``
    (``Memformer.rollout_logits``).

    The rows that reset before step ``t`` read the initial memory instead of ``memory``. The
    logits (``[B, L', V]``, aligned with ``rollout.targets[t]``) are None when ``with_logits`` is
    False or the step has nothing to predict (then the decoder does not run). ``seed`` is the
    segment's dropout seed (:func:`randomness.segment_seed`); None draws from the global
    generators as they are.
    """
    logits, new_memory = run_segment(
        model, rollout, t, memory, seed, head=decode_logits, with_head=with_logits
    )
    assert new_memory is not None
    return logits, new_memory


def rollout_step(
    model: Memformer,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    with_loss: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Segment ``t`` of a rollout: ``(loss share or None, M_{t+1})`` (``Memformer.rollout_step``).

    The loss share is the segment's summed cross-entropy divided by the rollout's target count
    (the shares add up to the rollout's mean); it is None when ``with_loss`` is False or the step
    has nothing to predict. See :func:`rollout_logits` for resets and ``seed``.
    """
    loss, new_memory = run_segment(model, rollout, t, memory, seed, with_head=with_loss)
    assert new_memory is not None  # the writer runs unless asked not to
    return (None if loss is None else loss / rollout.num_targets), new_memory


def summed_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of ``logits [B, L', V]`` against ``targets [B, L']`` (-100 ignored),
    in at least float32."""
    return F.cross_entropy(
        upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def sequence_loss(
    model: Memformer,
    input_ids: Tensor,
    memory: Tensor | None = None,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Full back-propagation through time over a rollout ``[B, T*L]``: ``(loss, M_T)``
    (``Memformer.sequence_loss``).

    ``loss`` is the mean cross-entropy over every predicted, non-ignored token; ``labels``
    default to ``input_ids`` and are shifted inside (HF causal-LM convention). This keeps every
    segment's activations alive: it is the ground truth that ``mrbp.backward`` reproduces.

    ``resets [B, T]`` (bool, keyword-only; ``T`` segments, the last may be partial): row ``b``
    restarts from the initial memory before segment ``t`` where ``resets[b, t]``, for batch rows
    packed with several documents. The initial memory's bias gets the gradient of every reset
    point. Resets change the memory only: to score a reset row exactly as a fresh run of it,
    also set to -100 the labels a fresh run would not predict (decoder: the first token of the
    reset segment; encoder-decoder: the whole reset segment).
    """
    generator = torch.default_generator.get_state()
    rollout = plan_rollout(model, input_ids, attention_mask, labels, resets=resets)
    try:
        memory = check_memory(model, memory, rollout.input_ids[0].shape[0])
    except BaseException:
        torch.default_generator.set_state(generator)  # refused: no rollout seed was drawn
        raise
    total: Tensor | None = None
    for t in range(len(rollout)):
        seed = None if rollout.seed is None else randomness.segment_seed(rollout.seed, t)
        loss, memory = rollout_step(model, rollout, t, memory, seed)
        if loss is not None:
            total = loss if total is None else total + loss
    assert total is not None
    return total, memory
