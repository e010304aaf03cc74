"""Memory Replay Back-Propagation (docs/design.md) against full back-propagation through time."""

from __future__ import annotations

import functools

import pytest
import torch
from testing_utils import (
    LiveSavedBytes,
    assert_mrbp_equals_bptt,
    count_checks,
    grads,
    make_model,
    relative_error,
    tiny_model,
)

from memformer_fast import mrbp

ARCHS = ["encoder-decoder", "decoder"]


# Every model of this file: its sizes, and dropout on unless a test turns it off.
make_model = functools.partial(
    make_model, vocab_size=31, n_memory_slots=4, segment_length=6, dropout=0.1
)


def rollout(T: int = 8, B: int = 3, ragged: int = 2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 31, (B, 6 * T + ragged), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6 * T // 2 :] = 0  # a sequence that ends early (padding from the middle on)
    labels = ids.clone()
    labels[2, 5:9] = -100
    return ids, mask, labels


def bptt(model, ids, mask, labels, seed=7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, memory = model.sequence_loss(ids, attention_mask=mask, labels=labels)
    loss.backward()
    return loss.detach(), memory.detach(), grads(model)


def replay(model, ids, mask, labels, seed=7, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    result = mrbp.backward(model, ids, attention_mask=mask, labels=labels, **kw)
    return result, grads(model)


# The random draws of training: dropout masks, and the memory noise (MemformerConfig.memory_noise).
RANDOMNESS = {"dropout": dict(dropout=0.1), "memory_noise": dict(dropout=0.0, memory_noise=0.5)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("randomness", list(RANDOMNESS))
def test_mrbp_gradients_equal_bptt_with_dropout(arch, dtype, tol, randomness):
    model = make_model(arch, dtype=dtype, **RANDOMNESS[randomness])
    ids, mask, labels = rollout(T=8)
    both = assert_mrbp_equals_bptt(model, ids, tol=tol, attention_mask=mask, labels=labels)
    assert both.num_segments == 9


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("randomness", list(RANDOMNESS))
def test_dropout_really_acts_and_is_reproduced(arch, randomness):
    """Dropout and the memory noise change the gradients (so the equality above is not
    vacuous)."""
    model = make_model(arch, **RANDOMNESS[randomness])
    ids, mask, labels = rollout(T=3)
    _, _, g1 = bptt(model, ids, mask, labels, seed=1)
    _, _, g2 = bptt(model, ids, mask, labels, seed=2)
    assert max(relative_error(g1[n], g2[n]) for n in g1) > 1e-3
    _, approx = replay(model, ids, mask, labels, seed=1, preserve_rng=False)
    assert max(relative_error(approx[n], g1[n]) for n in g1) > 1e-3


def test_gradients_accumulate_like_backward():
    model = make_model("decoder")
    ids, mask, labels = rollout(T=3)
    _, _, expected = bptt(model, ids, mask, labels)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.grad for n, p in model.named_parameters()}
    torch.manual_seed(7)
    mrbp.backward(model, ids, attention_mask=mask, labels=labels)
    for n, p in model.named_parameters():
        assert p.grad is before[n], "the .grad tensors are accumulated into, not replaced"
        torch.testing.assert_close(p.grad, expected[n] + 1)


def test_carried_memory_and_memory_gradient():
    """A given M_0 that requires grad receives its gradient, as in BPTT."""
    model = make_model("decoder", dropout=0.0)
    ids, mask, labels = rollout(T=3)
    m0 = model.init_memory(3).detach().clone()
    a = m0.clone().requires_grad_()
    loss, _ = model.sequence_loss(ids, memory=a, attention_mask=mask, labels=labels)
    loss.backward()
    b = m0.clone().requires_grad_()
    mrbp.backward(model, ids, b, attention_mask=mask, labels=labels)
    assert relative_error(b.grad, a.grad) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_loss_is_atomic(arch):
    model = make_model(arch, dropout=0.0, tie_embeddings=False)
    ids, mask, labels = rollout(T=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.lm_head.weight.grad = None
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")  # memory stays finite, every loss is NaN
    with pytest.raises(FloatingPointError, match="segment 0"):
        mrbp.backward(model, ids, attention_mask=mask, labels=labels)
    for n, p in model.named_parameters():
        if before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, before[n]), n
        if n != "lm_head.weight":
            assert torch.equal(p.detach(), state[n])


def test_non_finite_memory_names_its_segment():
    model = make_model("decoder", dropout=0.0)
    ids, _, _ = rollout(T=5, ragged=0)
    poison = 30
    ids[ids == poison] = 1
    ids[0, 6 * 3 + 2] = poison  # first seen in segment 3
    with torch.no_grad():
        model.embed.weight[poison] = float("inf")
    with pytest.raises(FloatingPointError, match="segment 3"):
        mrbp.backward(model, ids)
    assert all(p.grad is None for p in model.parameters())


def test_segments_without_targets_skip_the_decoder():
    model = make_model("encoder-decoder", dropout=0.0)
    ids, _, _ = rollout(T=5, ragged=0)
    labels = ids.clone()
    labels[:, 12:18] = -100  # segment 2 is never scored: step 1 has nothing to decode
    calls = []
    model.decoder[0].register_forward_hook(lambda *_: calls.append(1))
    mrbp.backward(model, ids, labels=labels)
    assert len(calls) == 3  # steps 0, 2, 3 decode; step 1 is skipped, step 4 has no next segment


def test_activation_memory_is_flat_in_rollout_length():
    model = make_model("encoder-decoder", dropout=0.0)
    peaks = {}
    for T in (4, 12):
        ids = torch.randint(0, 31, (2, 6 * T))
        with LiveSavedBytes() as m:
            mrbp.backward(model, ids)
        with LiveSavedBytes() as b:
            model.sequence_loss(ids)[0].backward()
        peaks[T] = (m.peak, b.peak)
    assert peaks[12][0] == peaks[4][0], peaks  # MRBP: one segment's activations, whatever T
    assert peaks[12][1] > 2.5 * peaks[4][1], peaks  # BPTT: grows with T


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_validates_each_argument_once(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """One ``mrbp.backward`` checks each argument once, and no segment's tensors (neither on the
    critical path nor in the replay) again."""
    model = make_model(arch)
    ids, mask, labels = rollout(T=3)
    memory = model.init_memory(ids.shape[0]).detach()
    counts = count_checks(monkeypatch)
    mrbp.backward(model, ids, memory, attention_mask=mask, labels=labels)
    arguments = [
        ("check_ids", "input_ids"),
        ("mask_format", "attention_mask"),
        ("check_resets", "resets"),
        ("check_labels", ""),
        ("check_memory", ""),
    ]
    assert counts == dict.fromkeys(arguments, 1), counts


# ------------------------------------------------------------------ gradient hooks: refused


def test_mrbp_refuses_post_accumulate_grad_hooks() -> None:
    """The optimizer-in-backward pattern would see one partial gradient per segment under MRBP:
    refused before anything runs, with the parameter named; nothing changes."""
    model = tiny_model("decoder")
    ids = torch.randint(0, 23, (2, 15), generator=torch.Generator().manual_seed(0))
    model.sequence_loss(ids)[0].backward()
    before = grads(model)
    calls: list[torch.Tensor] = []
    model.writer.bias.register_post_accumulate_grad_hook(calls.append)
    with pytest.raises(RuntimeError, match=r"parameter 'writer.bias' has a post-accumulate-grad"):
        mrbp.backward(model, ids)
    assert not calls
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, before[name]), name
    # BPTT fires it once per step, with the whole gradient.
    model.zero_grad(set_to_none=True)
    model.sequence_loss(ids)[0].backward()
    assert len(calls) == 1 and calls[0] is model.writer.bias


def test_mrbp_refuses_plain_gradient_hooks() -> None:
    """A ``register_hook`` hook would run once per segment under MRBP (once per rollout under
    BPTT), and a non-linear one (a clamp) would give other gradients than BPTT: refused like
    post-accumulate hooks, before anything runs; a removed hook is no hook."""
    model = tiny_model("decoder")
    ids = torch.randint(0, 23, (2, 15), generator=torch.Generator().manual_seed(0))
    model.sequence_loss(ids)[0].backward()
    before = grads(model)
    calls: list[torch.Tensor] = []
    weight = model.blocks[0].ff[0].weight
    handle = weight.register_hook(lambda g: calls.append(g) or g.clamp(-1e-3, 1e-3))
    with pytest.raises(RuntimeError, match=r"parameter 'blocks.0.ff.0.weight' has a gradient hook"):
        mrbp.backward(model, ids)
    assert not calls
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, before[name]), name
    handle.remove()
    mrbp.backward(model, ids)  # no hook left: accepted
