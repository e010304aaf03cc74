"""Rollouts: a sequence ``[B, T*L]`` cut into segments, each segment's step, and full BPTT.

:func:`plan_rollout` validates a rollout once and cuts it into segments with their targets; a
step (:func:`rollout_logits`, :func:`rollout_step`) runs one segment from a memory; and
:func:`sequence_loss` chains the steps with back-propagation through time, the ground truth that
:func:`memformer_fast.mrbp.backward` reproduces. The :class:`~memformer_fast.Memformer` methods
of the same names call these; the steps go through the model's methods, so a wrapper of one
method sees every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from . import randomness
from .validation import (
    IGNORE_INDEX,
    check_ids,
    check_labels,
    check_mask,
    check_memory,
    check_resets,
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


def _step_inputs(
    model: Memformer, ids: list[Tensor], masks: list[Tensor | None], labels: Tensor
) -> tuple[list[Tensor | None], list[Tensor | None], list[Tensor | None]]:
    """Per step: the labels it scores, the decoder's inputs and their masks (encoder-decoder)."""
    L = model.config.segment_length
    if model.is_encoder_decoder:
        step_labels: list[Tensor | None] = [*list(labels.split(L, dim=1))[1:], None]
        bos = model.config.bos_token_id
        shifted = [shift_right(i, m, bos) for i, m in zip(ids[1:], masks[1:])] + [(None, None)]
        return step_labels, [s[0] for s in shifted], [s[1] for s in shifted]
    nxt = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
    return list(nxt.split(L, dim=1)), [None] * len(ids), [None] * len(ids)


def plan_rollout(
    model: Memformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    resets: Tensor | None = None,
) -> Rollout:
    """Validate a rollout ``[B, T*L]`` and cut it into segments with their targets
    (:meth:`memformer_fast.Memformer.plan_rollout` documents the arguments)."""
    input_ids = check_ids(model, "input_ids", input_ids)
    mask = check_mask("attention_mask", attention_mask, input_ids)
    L = model.config.segment_length
    resets = check_resets(
        model,
        "resets",
        resets,
        [input_ids.shape[0], -(-input_ids.shape[1] // L)],
        f"[B, T] (one flag per segment of segment_length={L})",
    )
    labels = input_ids if labels is None else check_labels(model, labels, input_ids)
    if mask is not None:
        labels = labels.masked_fill(~mask, IGNORE_INDEX)
    ids = list(input_ids.split(L, dim=1))
    masks: list[Tensor | None] = (
        list(mask.split(L, dim=1)) if mask is not None else [None] * len(ids)
    )
    step_labels, decoder_inputs, decoder_masks = _step_inputs(model, ids, masks, labels)
    counts = [0 if t is None else int((t != IGNORE_INDEX).sum()) for t in step_labels]
    targets = [t if n > 0 else None for t, n in zip(step_labels, counts)]
    if sum(counts) == 0:
        reason = "every label is ignored or padded"
        if model.is_encoder_decoder and len(ids) < 2:
            reason = "the encoder-decoder model predicts segment t + 1: it needs two segments"
        raise ValueError(f"the rollout has no token to predict: {reason}")
    active = model.training and model.config.dropout > 0
    seed = randomness.draw_rollout_seed() if active else None
    columns: list[Tensor | None] | None = None
    if resets is not None:  # one host sync per rollout: which segments reset any row
        columns = [
            resets[:, t] if any_reset else None
            for t, any_reset in enumerate(resets.any(0).tolist())
        ]
    return Rollout(ids, masks, targets, decoder_inputs, decoder_masks, sum(counts), seed, columns)


def rollout_logits(
    model: Memformer,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    with_logits: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Segment ``t`` of a rollout: ``(logits of its targets or None, M_{t+1})``
    (:meth:`memformer_fast.Memformer.rollout_logits`)."""
    reset = None if rollout.resets is None else rollout.resets[t]
    if reset is not None:
        memory = model.reset_memory(memory, reset)
    with randomness.seeded(randomness.part_seed(seed, randomness.ENCODER), model.device):
        context, new_memory = model.read_segment(rollout.input_ids[t], memory, rollout.masks[t])
    if not with_logits or rollout.targets[t] is None:
        return None, new_memory
    with randomness.seeded(randomness.part_seed(seed, randomness.DECODER), model.device):
        logits = model.decode(
            rollout.decoder_inputs[t], context, rollout.masks[t], rollout.decoder_masks[t]
        )
    return logits, new_memory


def rollout_step(
    model: Memformer,
    rollout: Rollout,
    t: int,
    memory: Tensor,
    seed: int | None = None,
    with_loss: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Segment ``t`` of a rollout: ``(loss share or None, M_{t+1})``
    (:meth:`memformer_fast.Memformer.rollout_step`)."""
    logits, new_memory = model.rollout_logits(rollout, t, memory, seed, with_loss)
    targets = rollout.targets[t]
    if logits is None or targets is None:
        return None, new_memory
    loss_sum = F.cross_entropy(
        upcast(logits).flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum / rollout.num_targets, new_memory


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
    (:meth:`memformer_fast.Memformer.sequence_loss`)."""
    rollout = model.plan_rollout(input_ids, attention_mask, labels, resets=resets)
    memory = check_memory(model, memory, rollout.input_ids[0].shape[0])
    total: Tensor | None = None
    for t in range(len(rollout)):
        seed = None if rollout.seed is None else randomness.segment_seed(rollout.seed, t)
        loss, memory = model.rollout_step(rollout, t, memory, seed)
        if loss is not None:
            total = loss if total is None else total + loss
    assert total is not None
    return total, memory
