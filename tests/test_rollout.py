"""Rollouts (``memformer_fast.rollout``; docs/design.md, "The model"): which tokens
``sequence_loss`` predicts in each architecture, and what it ignores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from testing_utils import tiny_model


def test_sequence_loss_decoder_convention():
    """Decoder: every token but the first is predicted, across segment boundaries too."""
    model = tiny_model("decoder").eval()
    ids = torch.randint(0, 23, (2, 13))  # segments of 5, 5, 3
    loss, memory = model.sequence_loss(ids)
    mem, logits = None, []
    for seg in ids.split(5, dim=1):
        out = model(seg, memory=mem)
        logits.append(out.logits)
        mem = out.memory
    expected = F.cross_entropy(torch.cat(logits, 1)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(memory, mem)


def test_sequence_loss_encoder_decoder_convention():
    """Encoder-decoder: segment t+1 is decoded from segment t; the first is context only."""
    model = tiny_model("encoder-decoder").eval()
    ids = torch.randint(0, 23, (2, 15))
    labels = ids.clone()
    labels[1, 7] = -100
    loss, _ = model.sequence_loss(ids, labels=labels)
    segs, lab = ids.split(5, dim=1), labels.split(5, dim=1)
    mem, total, count = None, 0.0, 0
    for t in range(2):
        bos = torch.zeros(2, 1, dtype=torch.long)
        out = model(segs[t], memory=mem, decoder_input_ids=torch.cat([bos, segs[t + 1][:, :-1]], 1))
        total = total + F.cross_entropy(
            out.logits.flatten(0, 1), lab[t + 1].flatten(), reduction="sum"
        )
        count += int((lab[t + 1] != -100).sum())
        mem = out.memory
    torch.testing.assert_close(loss, total / count)


def test_sequence_loss_ignores_padding_and_minus_100():
    model = tiny_model("decoder").eval()
    ids = torch.randint(0, 23, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.clone()
    labels[1, 2] = -100
    a, _ = model.sequence_loss(ids, attention_mask=mask, labels=labels)
    changed = ids.clone()
    changed[0, 6:] = 3
    b, _ = model.sequence_loss(changed, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a, b)
