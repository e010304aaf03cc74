"""The drop-in layers (``memformer_fast.layers``): the writer's self value, rotary positions,
attention masks and causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing_utils import count_checks

from memformer_fast import MemoryWriter


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


@pytest.mark.parametrize("causal", [False, True])
def test_memory_block_validates_each_argument_once(
    monkeypatch: pytest.MonkeyPatch, causal: bool
) -> None:
    """One ``MemoryBlock.forward`` checks each of its arguments once, and the tensors it builds
    (its sublayers' inputs, the queries, keys and values of the memory read) not at all."""
    from memformer_fast.layers import MemoryBlock, attention_mask_2d

    torch.manual_seed(0)
    block = MemoryBlock(16, 2, 32, 0.0, "reference", causal=causal)
    h, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    mask = attention_mask_2d(torch.rand(2, 5) > 0.3, 5, causal, h.device)
    counts = count_checks(monkeypatch)
    block(h, memory, mask)
    leaf_checks = {
        ("check_states", "h"): 1,
        ("check_attention_mask", "mask"): 1,
        ("check_states", "memory"): 1,
        ("check_pair", "memory"): 1,
    }
    assert {k: v for k, v in counts.items() if k in leaf_checks} == leaf_checks
    # The composite check that ran the last two, and nothing else.
    assert set(counts) - set(leaf_checks) == {("check_memory_states", "h")}, counts


def test_memory_writer_validates_each_argument_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``MemoryWriter.forward``: its arguments once each, the attention's and the update's
    tensors (built by the writer) not at all."""
    torch.manual_seed(0)
    writer = MemoryWriter(16, 2, 3, backend="reference")
    memory, x, mask = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.rand(2, 5) > 0.3
    counts = count_checks(monkeypatch)
    writer(memory, x, mask)
    assert counts == {
        ("check_states", "memory"): 1,
        ("check_context", "memory"): 1,
        ("check_states", "x"): 1,
        ("check_pair", "x"): 1,
        ("check_key_mask", "token_mask"): 1,
    }, counts


def test_public_functional_validates_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A public functional call checks its tensors once (not again for the chosen backend)."""
    from memformer_fast import functional

    q, k = torch.randn(2, 5, 2, 4), torch.randn(2, 3, 2, 4)
    counts = count_checks(monkeypatch)
    functional.memory_read_attention(q, k, k, backend="reference")
    assert counts[("_check_tensors", "")] == 1
    assert counts[("_check_shape", "q")] == counts[("_check_shape", "k")] == 1
