"""The model (docs/design.md, "The model"): shapes, masks, conventions, state dicts, generation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from testing_utils import tiny_model

from memformer_fast import Memformer, MemoryWriter

ARCHS = ["encoder-decoder", "decoder"]


def tiny(arch: str, **overrides) -> Memformer:
    return tiny_model(arch, **overrides).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_memory_dtype(arch):
    model = tiny(arch)
    ids = torch.randint(0, 23, (4, 5))
    out = model(ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (4, 5, 23)
    assert out.memory.shape == (4, 3, 16) and out.memory.dtype == torch.float32
    assert out.loss is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.memory.norm(dim=-1), torch.ones(4, 3))
    assert model(ids[:, :3]).memory.shape == (4, 3, 16)  # a shorter segment is fine


def test_encoder_decoder_without_decoder_input_only_writes():
    model = tiny("encoder-decoder")
    out = model(torch.randint(0, 23, (2, 5)))
    assert out.logits is None and out.loss is None


def test_init_memory_and_initialisation_contract():
    model = tiny("decoder")
    m0 = model.init_memory(3)
    bias = model.writer.bias
    torch.testing.assert_close(m0, F.normalize(bias, dim=-1).expand(3, -1, -1))
    torch.testing.assert_close(bias.norm(dim=-1), torch.full((3,), model.config.bias_init_norm))
    assert 0 < model.config.bias_init_norm <= 0.1  # small: a large bias wipes the slots
    assert model.writer.gate is not None
    assert torch.all(model.writer.gate.bias == model.config.gate_bias_init)
    # the memory stays in memory_dtype even when the model runs in another dtype
    assert model.double().init_memory(1).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_leaks_into_real_tokens_or_memory(arch):
    model = tiny(arch)
    ids = torch.randint(0, 23, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = ids.clone()
    other[0, 3:] = (ids[0, 3:] + 7) % 23  # change only padded tokens
    dec = {"decoder_input_ids": ids} if arch == "encoder-decoder" else {}
    a = model(ids, attention_mask=mask, **dec)
    b = model(other, attention_mask=mask, **dec)
    torch.testing.assert_close(a.memory, b.memory)
    if arch == "decoder":
        torch.testing.assert_close(a.logits[0, :3], b.logits[0, :3])
    else:
        torch.testing.assert_close(a.logits, b.logits)
    assert torch.isfinite(a.logits).all()


def test_all_padding_segment_keeps_the_memory():
    model = tiny("decoder")
    memory = model(torch.randint(0, 23, (2, 5))).memory
    mask = torch.tensor([[0] * 5, [1] * 5])
    out = model(torch.randint(0, 23, (2, 5)), memory=memory, attention_mask=mask)
    assert torch.equal(out.memory[0], memory[0])
    assert not torch.equal(out.memory[1], memory[1])


def test_writer_self_value_is_the_raw_slot():
    """A slot that attends only to itself is carried over unchanged before BMN (design.md,
    "Memory write")."""
    torch.manual_seed(0)
    writer = MemoryWriter(8, 2, 3, gate=False, backend="reference")
    with torch.no_grad():
        writer.bias.zero_()
    memory = F.normalize(torch.randn(1, 3, 8), dim=-1)
    x = torch.randn(1, 4, 8)
    # All tokens masked on a row that still counts as real: force the self-only path directly.
    from memformer_fast import functional as Fn

    q = torch.randn(1, 3, 2, 4)
    out = Fn.memory_write_attention(
        q,
        q,
        memory.view(1, 3, 2, 4),
        x.view(1, 4, 2, 4),
        x.view(1, 4, 2, 4),
        token_mask=torch.zeros(1, 4, dtype=torch.bool),
        backend="reference",
    )
    new = Fn.gated_memory_update(memory, out.flatten(2), writer.bias, backend="reference")
    torch.testing.assert_close(new, memory)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_across_backends(arch):
    model = tiny(arch)
    clone = tiny(arch, backend="auto")
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    clone.load_state_dict(model.state_dict())
    ids = torch.randint(0, 23, (2, 15))
    torch.testing.assert_close(model.sequence_loss(ids)[0], clone.sequence_loss(ids)[0])
    assert set(model.state_dict()) == set(clone.state_dict())


def test_sequence_loss_decoder_convention():
    """Decoder: every token but the first is predicted, across segment boundaries too."""
    model = tiny("decoder")
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
    model = tiny("encoder-decoder")
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
    model = tiny("decoder")
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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [3, 5, 7, 10])
def test_generation_equals_segment_by_segment_forward(arch, prompt_len):
    model = tiny(arch)
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
    model = tiny("decoder")
    head = torch.randint(0, 23, (1, 10))  # two full segments
    tail = torch.randint(0, 23, (1, 2))
    full = model.generate(torch.cat([head, tail], 1), 8)
    mem = None
    for seg in head.split(5, dim=1):
        mem = model(seg, memory=mem).memory
    assert torch.equal(model.generate(tail, 8, memory=mem), full)


def test_sampling_is_seeded():
    model = tiny("decoder")
    prompt = torch.randint(0, 23, (2, 4))
    draws = [
        model.generate(
            prompt, 9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_odd_head_dim(arch):
    """An odd head dimension works: rotary leaves the last feature unrotated."""
    model = tiny(arch, d_model=30, n_heads=2)
    ids = torch.randint(0, 23, (2, 12))
    loss, memory = model.sequence_loss(ids)
    assert torch.isfinite(loss) and memory.shape == (2, 3, 30)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rotary_attention_depends_on_relative_positions_only():
    """Shifting queries and keys together leaves rotary logits unchanged (even and odd Dh)."""
    from memformer_fast.layers import apply_rotary, rotary_tables

    for head_dim in (8, 9):
        half = head_dim // 2
        inv_freq = 10000.0 ** (-torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half))
        cos, sin = rotary_tables(inv_freq, head_dim, torch.arange(12.0), torch.float64)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [L, 1, Dh] against [B, L, H, Dh]
        q = torch.randn(1, 1, 1, head_dim, dtype=torch.float64).expand(1, 12, 1, head_dim)
        k = torch.randn(1, 1, 1, head_dim, dtype=torch.float64).expand(1, 12, 1, head_dim)
        qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        logits = torch.einsum("blhd,bmhd->lm", qr, kr)
        torch.testing.assert_close(logits[3, 1], logits[10, 8])  # both at distance 2
        torch.testing.assert_close(logits[5, 5], logits[0, 0])
        if head_dim % 2:  # the odd feature is left as it was
            assert torch.equal(qr[..., -1], q[..., -1])


def test_rotary_is_the_rotate_half_formula():
    """``apply_rotary`` is ``[x1 cos - x2 sin, x2 cos + x1 sin, rest]`` bit for bit, values pass the
    attention's tables unchanged, and the cached tables follow ``inv_freq`` and the dtype."""
    from memformer_fast.layers import RotarySelfAttention, apply_rotary, rotary_tables

    for head_dim in (8, 9):
        half = head_dim // 2
        inv_freq = 10000.0 ** (-torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half))
        angles = torch.arange(7.0)[:, None] * inv_freq
        c, s = angles.cos()[:, None], angles.sin()[:, None]
        x = torch.randn(2, 7, 3, head_dim)
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)
        cos, sin = rotary_tables(inv_freq, head_dim, torch.arange(7.0), torch.float32)
        assert torch.equal(apply_rotary(x, cos[:, None], sin[:, None]), expected)
    attn = RotarySelfAttention(16, 2)
    cos, sin = attn._rotary_tables(3, 5, torch.float32)
    assert cos.shape == sin.shape == (5, 3, 1, 8)
    assert torch.equal(cos[:, 2], torch.ones(5, 1, 8))  # values pass unchanged
    assert torch.equal(sin[:, 2], torch.zeros(5, 1, 8))
    with torch.no_grad():
        attn.inv_freq.mul_(2.0)  # written in place (a checkpoint loader): the tables follow
    assert not torch.equal(attn._rotary_tables(3, 5, torch.float32)[0], cos)
    assert attn._rotary_tables(0, 4, torch.float64)[0].dtype == torch.float64
    fresh = RotarySelfAttention(16, 2)
    with torch.inference_mode():
        fresh(torch.randn(1, 4, 16), None)
    x = torch.randn(1, 4, 16, requires_grad=True)
    fresh(x, None).sum().backward()  # a table built under inference_mode is not saved for backward
    assert x.grad is not None


def test_attention_masks_are_converted_once_per_mask_and_follow_in_place_changes():
    """Self- and cross-attention give SDPA the float mask it would make of the bool one (bit for
    bit), converted once per mask tensor and dtype, rebuilt when the mask is written in place,
    and never a table made under inference_mode where autograd needs it."""
    from memformer_fast.layers import (
        CrossAttention,
        RotarySelfAttention,
        _additive_mask,
        attention_mask_2d,
    )

    torch.manual_seed(0)
    cross, attn = CrossAttention(16, 2), RotarySelfAttention(16, 2)
    x, context = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    context_mask = torch.tensor([[True] * 6, [True, True, False, False, False, False], [False] * 6])

    def expected_cross(mask: torch.Tensor) -> torch.Tensor:  # the bool mask, as SDPA takes it
        q = cross.q(x).unflatten(-1, (2, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in cross.kv(context).chunk(2, -1))
        allowed = mask[:, None, None, :] | ~mask.any(-1)[:, None, None, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return cross.out(o.transpose(1, 2).flatten(2))

    first = cross(x, context, context_mask)
    assert torch.equal(first, expected_cross(context_mask))  # row 2 (no real key) sees all
    assert _additive_mask(context_mask, torch.float32, context=True) is _additive_mask(
        context_mask, torch.float32, context=True
    )
    context_mask[0, 3:] = False  # written in place: the cached conversion is stale
    assert torch.equal(cross(x, context, context_mask), expected_cross(context_mask.clone()))
    assert not torch.equal(cross(x, context, context_mask), first)

    mask = attention_mask_2d(context_mask[:, :4], 4, causal=False, device=x.device)
    with torch.inference_mode():
        attn(x, mask)  # converts (and caches) under inference_mode
    h = x.clone().requires_grad_()
    out = attn(h, mask)
    out.sum().backward()  # the cached inference tensor is not what autograd saved
    assert h.grad is not None and torch.equal(out, attn(x, mask.clone()))  # cached = fresh
    q, k, v = torch.randn(3, 3, 2, 4, 8).unbind(0)
    for causal in (False, True):
        mask = attention_mask_2d(context_mask[:, :4], 4, causal, x.device)
        assert torch.equal(
            F.scaled_dot_product_attention(q, k, v, attn_mask=_additive_mask(mask, q.dtype)),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        )


def test_causal_blocks_stay_causal_with_any_bool_mask():
    """A causal layer given a bool mask (a ``[B, 1, 1, L]`` key mask, or an all-True
    ``[B, 1, L, L]``) stays causal: SDPA takes a mask or ``is_causal``, not both, so the layer
    intersects the mask with the causal one. No gradient from the future, and an all-True mask
    equals no mask."""
    from memformer_fast.layers import DecoderBlock, MemoryBlock, RotarySelfAttention

    torch.manual_seed(0)
    B, L, D = 2, 5, 16
    block = MemoryBlock(D, 2, 32, 0.0, "reference", causal=True)
    decoder_block = DecoderBlock(D, 2, 32, 0.0)
    attn = RotarySelfAttention(D, 2)
    memory, context = torch.randn(B, 3, D), torch.randn(B, 4, D)
    layers = {
        "memory-block": lambda h, m: block(h, memory, m),
        "decoder-block": lambda h, m: decoder_block(h, context, m, None),
        "attention": lambda h, m: attn(h, m, is_causal=True),
    }
    key_mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    key_mask[1, ..., 3] = False  # a padded key: hidden from every query, as before
    masks = {
        "keys-all-true": torch.ones(B, 1, 1, L, dtype=torch.bool),
        "full-all-true": torch.ones(B, 1, L, L, dtype=torch.bool),
        "broadcast-all-true": torch.ones(1, 1, 1, L, dtype=torch.bool),
        "keys-padded": key_mask,
    }
    x = torch.randn(B, L, D)
    for name, layer in layers.items():
        unmasked = layer(x, None)
        for mask_name, mask in masks.items():
            h = x.clone().requires_grad_()
            out = layer(h, mask)
            (grad,) = torch.autograd.grad(out[:, 0].sum(), h, retain_graph=True)
            assert grad[:, 1:].abs().max() == 0, (name, mask_name)
            if mask_name != "keys-padded":
                torch.testing.assert_close(out, unmasked, msg=f"{name} {mask_name}")
            else:  # the padded key still reaches no query of row 1, and the future none
                (grad,) = torch.autograd.grad(out[1, 4].sum(), h)
                assert grad[1, 3].abs().max() == 0, name
