"""``mrbp.backward_segments``: MRBP for a model of the user's own, against plain BPTT.

The model is what a user builds from the drop-in layers: ``nn.TransformerEncoderLayer`` (dropout
on) plus ``MemoryReader`` / ``MemoryWriter``, trained over segments through its memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from testing_utils import LiveSavedBytes, grads, relative_error
from torch import Tensor, nn

from memformer_fast import MemoryReader, MemoryWriter, mrbp

VOCAB, D, HEADS, SLOTS, L, B = 17, 16, 2, 3, 5, 2


class UserModel(nn.Module):
    """Embedding, a memory read, a stock Transformer layer, an LM head; the memory writer."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.reader = MemoryReader(D, HEADS)
        self.drop = nn.Dropout(dropout)
        self.layer = nn.TransformerEncoderLayer(
            D, HEADS, dim_feedforward=32, dropout=dropout, batch_first=True
        )
        self.writer = MemoryWriter(D, HEADS, SLOTS)
        self.head = nn.Linear(D, VOCAB)

    def step(self, segment: tuple[Tensor, Tensor], memory: Tensor) -> tuple[Tensor, Tensor]:
        """``segment = (ids [B, L], targets [B, L])``, ``memory [B, S, D]``."""
        ids, targets = segment
        h = self.embed(ids)
        h = h + self.drop(self.reader(h, memory))
        h = self.layer(h)
        loss = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())
        return loss, self.writer(memory, h)


def make(dtype: torch.dtype = torch.float64, dropout: float = 0.2) -> UserModel:
    torch.manual_seed(0)
    return UserModel(dropout).to(dtype).train()


def segments(T: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T * L + 1), generator=g)
    return [(ids[:, t * L : (t + 1) * L], ids[:, t * L + 1 : (t + 1) * L + 1]) for t in range(T)]


def bptt(model: UserModel, segs: list[Any], seed: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    """The ground truth: the loop under grad, one backward; ``(loss, M_T, generator state)``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    memory = model.writer.initial_memory(B, model.head.weight.dtype)
    total = torch.zeros((), dtype=memory.dtype)
    for segment in segs:
        loss, memory = model.step(segment, memory)
        total = total + loss
    total.backward()
    return total.detach(), memory.detach(), torch.get_rng_state()


def replay(model: UserModel, segs: list[Any], seed: int = 7, **kw: Any) -> mrbp.MRBPResult:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    memory = model.writer.initial_memory(B, model.head.weight.dtype)
    return mrbp.backward_segments(model.step, segs, memory, **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_user_model_gradients_equal_bptt_with_dropout(dtype: torch.dtype, tol: float) -> None:
    model = make(dtype)
    segs = segments(T=6)
    loss, memory, rng_after = bptt(model, segs)
    expected = grads(model)
    result = replay(model, segs)
    actual = grads(model)
    assert result.num_segments == 6
    assert relative_error(result.loss, loss) < tol
    assert relative_error(result.memory, memory) < tol
    assert torch.equal(torch.get_rng_state(), rng_after)  # the generator ends where BPTT's does
    assert set(actual) == set(expected) == {n for n, _ in model.named_parameters()}
    worst = max(relative_error(actual[n], expected[n]) for n in expected)
    assert worst < tol, worst


def test_dropout_acts_so_the_equality_is_not_vacuous() -> None:
    model = make()
    segs = segments(T=3)
    bptt(model, segs, seed=1)
    first = grads(model)
    bptt(model, segs, seed=2)
    assert max(relative_error(first[n], p.grad) for n, p in model.named_parameters()) > 1e-3


def test_fresh_masks_without_preserve_rng_give_other_gradients() -> None:
    """``preserve_rng=False`` replays with fresh dropout masks: the restore above is what makes
    the gradients exact."""
    model = make()
    segs = segments(T=3)
    bptt(model, segs)
    expected = grads(model)
    replay(model, segs, preserve_rng=False)
    assert max(relative_error(p.grad, expected[n]) for n, p in model.named_parameters()) > 1e-3


def test_dict_segments_offload_and_accumulation() -> None:
    """Segments as dicts, the replay buffer offloaded, and ``.grad`` accumulated into (the same
    tensors, as ``loss.backward()`` would)."""
    model = make()
    segs = segments(T=4)
    bptt(model, segs)
    expected = grads(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.grad for n, p in model.named_parameters()}
    torch.manual_seed(7)
    memory = model.writer.initial_memory(B, torch.float64)

    def step(segment: dict[str, Tensor], m: Tensor) -> tuple[Tensor, Tensor]:
        return model.step((segment["ids"], segment["targets"]), m)

    dicts = [{"ids": i, "targets": t} for i, t in segs]
    mrbp.backward_segments(step, dicts, memory, offload=True)
    for n, p in model.named_parameters():
        assert p.grad is before[n]
        torch.testing.assert_close(p.grad, expected[n] + 1, rtol=1e-10, atol=1e-12)


def test_parameters_restrict_what_gets_a_gradient() -> None:
    """``parameters`` names the tensors to train; the others' ``.grad`` stay as they were."""
    model = make()
    segs = segments(T=3)
    bptt(model, segs)
    expected = grads(model)
    result = replay(model, segs, parameters=model.layer.parameters())
    assert result.num_segments == 3
    for n, p in model.named_parameters():
        if n.startswith("layer."):
            assert relative_error(p.grad, expected[n]) < 1e-12, n
        else:
            assert p.grad is None, n


def test_activation_memory_is_flat_in_rollout_length() -> None:
    model = make(dropout=0.0)
    peaks = {}
    for T in (3, 9):
        segs = segments(T)
        with LiveSavedBytes() as meter:
            replay(model, segs)
        peaks[T] = meter.peak
    assert peaks[9] == peaks[3], peaks


# ---- bad input: a clear error, and nothing changed (every .grad, the generator)


def _bad_steps(model: UserModel) -> dict[str, tuple[Callable[..., Any], list[Any], type, str]]:
    segs = segments(T=3)

    def nan_loss_at_2(segment: Any, memory: Tensor) -> tuple[Tensor, Tensor]:
        loss, new = model.step(segment, memory)
        return (loss * float("nan") if segment is segs[2] else loss), new

    def vector_loss(segment: Any, memory: Tensor) -> tuple[Tensor, Tensor]:
        loss, new = model.step(segment, memory)
        return loss.expand(3), new

    def narrow_memory(segment: Any, memory: Tensor) -> tuple[Tensor, Tensor]:
        loss, new = model.step(segment, memory)
        return loss, new[:, :2]

    def one_value(segment: Any, memory: Tensor) -> Tensor:
        return model.step(segment, memory)[0]

    return {
        "empty": (model.step, [], ValueError, "segments must hold at least one segment"),
        "not-a-sequence": (
            model.step, iter(segs), TypeError, "segments must be a sequence",
        ),
        "vector-loss": (
            vector_loss, segs, ValueError, r"0-dim floating-point loss, got shape \[3\]",
        ),
        "memory-shape": (
            narrow_memory, segs, ValueError,
            r"new memory like the memory \(shape \[2, 3, 16\].*got shape \[2, 2, 16\]",
        ),
        "not-a-pair": (one_value, segs, TypeError, r"step must return \(loss, new_memory\)"),
        "nan-loss": (
            nan_loss_at_2, segs, FloatingPointError,
            "mrbp.backward_segments: the loss of segment 2 is not finite",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["empty", "not-a-sequence", "vector-loss", "memory-shape", "not-a-pair", "nan-loss"]
)
def test_bad_input_raises_clearly_and_changes_nothing(case: str) -> None:
    model = make()
    step, segs, error, message = _bad_steps(model)[case]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = grads(model)
    memory = model.writer.initial_memory(B, torch.float64)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    with pytest.raises(error, match=message):
        mrbp.backward_segments(step, segs, memory)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n]), n


def test_bad_arguments_name_themselves() -> None:
    model = make()
    segs = segments(T=2)
    memory = model.writer.initial_memory(B, torch.float64)
    with pytest.raises(TypeError, match="step must be callable, got int"):
        mrbp.backward_segments(3, segs, memory)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"memory must be a floating-point tensor, got dtype torch\.int"
    ):
        mrbp.backward_segments(model.step, segs, memory.long())
    with pytest.raises(TypeError, match="offload must be a bool, got int 1"):
        mrbp.backward_segments(model.step, segs, memory, offload=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"parameters\[0\] is requires_grad=False"):
        mrbp.backward_segments(model.step, segs, memory, parameters=[torch.zeros(2)])
    assert all(p.grad is None for p in model.parameters())


def test_a_gradient_hook_is_refused_before_any_gradient() -> None:
    """A hook would see one partial gradient per segment: refused, as by ``mrbp.backward``, on
    the leaves found in the graph too."""
    model = make()
    calls: list[Tensor] = []
    model.head.weight.register_hook(lambda g: calls.append(g) or g)
    memory = model.writer.initial_memory(B, torch.float64)
    with pytest.raises(RuntimeError, match=r"a parameter of shape \[17, 16\] has a gradient hook"):
        mrbp.backward_segments(model.step, segments(T=2), memory)
    assert not calls and all(p.grad is None for p in model.parameters())
