"""Generation (``memformer_fast.generation``; docs/design.md, "The model"): streaming in constant
memory equals the segment-by-segment forward, a carried memory stands for its prompt, sampling is
seeded."""

from __future__ import annotations

import itertools

import pytest
import torch
from testing_utils import tiny_model

from memformer_fast.config import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("prompt_len", [3, 5, 7, 10])
def test_generation_equals_segment_by_segment_forward(arch, prompt_len):
    model = tiny_model(arch).eval()
    prompt = torch.randint(0, 23, (2, prompt_len))
    new = model.generate(prompt, 12)
    assert new.shape == (2, 12)
    seq = torch.cat([prompt, new], dim=1)
    L = 5
    if arch == "decoder":
        mem, logits = None, []
        for seg in seq.split(L, dim=1):
            out = model(seg, memory=mem)
            logits.append(out.logits)
            mem = out.memory
        predicted = torch.cat(logits, 1).argmax(-1)[:, prompt_len - 1 : -1]
        assert torch.equal(predicted, new)
    else:
        # segments from the prompt start; a prompt shorter than a segment is a short first segment
        bounds = [0, prompt_len] if prompt_len < L else list(range(0, seq.shape[1], L))
        if prompt_len < L:
            bounds += list(range(prompt_len + L, seq.shape[1], L))
        bounds.append(seq.shape[1])
        segs = [seq[:, a:b] for a, b in itertools.pairwise(bounds) if b > a]
        mem, preds, offset = None, [], segs[0].shape[1]
        for t in range(len(segs) - 1):
            nxt = segs[t + 1]
            dec_in = torch.cat([torch.zeros(2, 1, dtype=torch.long), nxt[:, :-1]], 1)
            out = model(segs[t], memory=mem, decoder_input_ids=dec_in)
            preds.append(out.logits.argmax(-1))
            mem = out.memory
        predicted = torch.cat(preds, 1)[:, prompt_len - offset :]
        assert torch.equal(predicted, new)


def test_streaming_generation_with_carried_memory():
    """Generating from a memory equals generating after the prompt that produced it."""
    model = tiny_model("decoder").eval()
    head = torch.randint(0, 23, (1, 10))  # two full segments
    tail = torch.randint(0, 23, (1, 2))
    full = model.generate(torch.cat([head, tail], 1), 8)
    mem = None
    for seg in head.split(5, dim=1):
        mem = model(seg, memory=mem).memory
    assert torch.equal(model.generate(tail, 8, memory=mem), full)


def test_sampling_is_seeded():
    model = tiny_model("decoder").eval()
    prompt = torch.randint(0, 23, (2, 4))
    draws = [
        model.generate(
            prompt, 9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
