"""Semantics stated or refused: gradient hooks under MRBP, double backward per backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from testing_utils import grads, tiny_model

from memformer_fast import functional, mrbp
from memformer_fast.backends import triton_available


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


def _ops(dtype: torch.dtype) -> list[tuple[str, Callable[..., torch.Tensor], list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    return [
        ("read", functional.memory_read_attention, [r(1, 3, 1, 4), r(1, 2, 1, 4), r(1, 2, 1, 4)]),
        (
            "write",
            functional.memory_write_attention,
            [r(1, 2, 1, 4), r(1, 2, 1, 4), r(1, 2, 1, 4), r(1, 3, 1, 4), r(1, 3, 1, 4)],
        ),
        ("update", functional.gated_memory_update, [r(1, 2, 4), r(1, 2, 4), r(2, 4), r(1, 2, 4)]),
    ]


@pytest.mark.parametrize("op", ["read", "write", "update"])
def test_double_backward_works_on_reference(op: str) -> None:
    _name, fn, inputs = next(o for o in _ops(torch.float64) if o[0] == op)
    assert torch.autograd.gradgradcheck(lambda *x: fn(*x, backend="reference"), inputs)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("op", ["read", "write", "update"])
def test_double_backward_on_triton_raises_clearly(op: str) -> None:
    _name, fn, inputs = next(o for o in _ops(torch.float32) if o[0] == op)
    out = fn(*inputs, backend="triton")
    first = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* not supported by backend='triton'"):
        sum(g.sum() for g in first).backward()
