"""Per-row memory resets: a row's memory restarts at a document start.

``forward(reset=[B])``, ``sequence_loss(resets=[B, T])``, ``mrbp.backward(resets=[B, T])`` and
``stream``/``generate(reset=[B])``. Checked three ways: MRBP equals BPTT with resets (dropout,
padding and -100 labels on); a reset row equals a fresh, independent run of that row (logits,
memory, loss and every gradient, the memory bias's included, so each reset point contributes);
bad input raises a clear error and changes nothing.
"""

from __future__ import annotations

import functools
import pathlib
from types import SimpleNamespace

import pytest
import torch
from testing_utils import (
    BAD_CALL_MODEL,
    META,
    Case,
    assert_mrbp_equals_bptt,
    bad_call_env,
    check_case,
    grads,
    make_model,
    relative_error,
)

from memformer_fast import mrbp

ARCHS = ["encoder-decoder", "decoder"]
L = 6  # segment length of the models below
V = 31
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


make_model = functools.partial(
    make_model, vocab_size=V, n_memory_slots=4, segment_length=L, dropout=0.1
)


def packed_batch(T: int = 7, B: int = 3, ragged: int = 2):
    """A rollout with resets at the first segment, in the middle, twice in one row and at the
    last (partial) segment, plus padding and ignored labels."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, L * T + ragged), generator=g)
    mask = torch.ones_like(ids)
    mask[1, L * 5 :] = 0  # row 1 ends early
    labels = ids.clone()
    labels[2, 4:9] = -100
    resets = torch.zeros(B, T + 1, dtype=torch.bool)
    resets[0, [0, 2, T - 1]] = True
    resets[1, 3] = True
    resets[2, [1, T]] = True
    return ids, mask, labels, resets


# ------------------------------------------------------------------------ MRBP equals BPTT


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mrbp_with_resets_equals_bptt(arch: str, dtype: torch.dtype, tol: float) -> None:
    """Loss, final memory and every gradient, with dropout, padding and -100 labels, and a carried
    memory that requires grad (its reset rows get no gradient from segment 0 on)."""
    model = make_model(arch, dtype=dtype)
    ids, mask, labels, resets = packed_batch()
    torch.manual_seed(11)
    start = torch.randn(3, 4, 16, dtype=dtype)
    start = torch.nn.functional.normalize(start, dim=-1)
    both = assert_mrbp_equals_bptt(
        model, ids, start, tol=tol, attention_mask=mask, labels=labels, resets=resets
    )
    assert "writer.bias" in both.mrbp
    assert both.bptt_memory_grad is not None and both.mrbp_memory_grad is not None
    assert torch.count_nonzero(both.bptt_memory_grad[0]) == 0  # row 0 resets before segment 0
    assert torch.count_nonzero(both.bptt_memory_grad[1]) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_mrbp_with_resets_from_the_initial_memory(arch: str) -> None:
    """No memory given (M_0 from the bias), resets everywhere in one row: still exact."""
    model = make_model(arch)
    ids, mask, labels, resets = packed_batch(T=4)
    resets[1] = True
    assert_mrbp_equals_bptt(
        model, ids, tol=1e-5, seed=5, attention_mask=mask, labels=labels, resets=resets
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_resets_change_the_memory_and_only_where_asked(arch: str) -> None:
    """All-False resets are bitwise the same as none; a reset changes the result (the tests
    above are not vacuous)."""
    model = make_model(arch, dropout=0.0).eval()
    ids, mask, labels, resets = packed_batch(T=4)
    plain = model.sequence_loss(ids, attention_mask=mask, labels=labels)
    none = model.sequence_loss(
        ids, attention_mask=mask, labels=labels, resets=torch.zeros_like(resets)
    )
    assert torch.equal(plain[0], none[0]) and torch.equal(plain[1], none[1])
    reset = model.sequence_loss(ids, attention_mask=mask, labels=labels, resets=resets)
    assert not torch.equal(plain[0], reset[0])
    assert not torch.allclose(plain[1][2], reset[1][2])  # row 2 resets before its last segment


# ----------------------------------------------------------- a reset row is a fresh run


def fresh_labels(arch: str, ids: torch.Tensor, docs: dict[int, list[tuple[int, int]]]):
    """Labels that score, in each row, only what a fresh run of each document ``(first, end)``
    (segment indices, end exclusive) would predict; -100 everywhere else."""
    labels = torch.full_like(ids, -100)
    skip = 1 if arch == "decoder" else L  # the decoder never predicts a run's first token, the
    for row, spans in docs.items():  # encoder-decoder never its first segment
        for first, end in spans:
            labels[row, first * L + skip : end * L] = ids[row, first * L + skip : end * L]
    return labels


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["bptt", "mrbp"])
def test_reset_rows_equal_fresh_independent_runs(arch: str, method: str) -> None:
    """Row 0 holds two documents (segments 1-2 and 3-5), row 1 one (segments 2-5); only they are
    scored. The packed rollout's loss is the target-weighted mean of the fresh runs' losses, its
    gradients the same mix of theirs (the memory bias gets one contribution per reset point),
    and each row's final memory is its last document's fresh final memory."""
    model = make_model(arch, dropout=0.0)
    T = 6
    ids = torch.randint(0, V, (2, T * L), generator=torch.Generator().manual_seed(9))
    docs = {0: [(1, 3), (3, 6)], 1: [(2, 6)]}
    resets = torch.zeros(2, T, dtype=torch.bool)
    for row, spans in docs.items():
        for first, _ in spans:
            resets[row, first] = True
    labels = fresh_labels(arch, ids, docs)

    model.zero_grad(set_to_none=True)
    if method == "bptt":
        loss, memory = model.sequence_loss(ids, labels=labels, resets=resets)
        loss.backward()
    else:
        result = mrbp.backward(model, ids, labels=labels, resets=resets)
        loss, memory = result.loss, result.memory
    packed = grads(model)

    total, mixed, count, finals = 0.0, {}, 0, {}
    for row, spans in docs.items():
        for first, end in spans:
            doc = ids[row : row + 1, first * L : end * L]
            n = (end - first) * L - (1 if arch == "decoder" else L)
            model.zero_grad(set_to_none=True)
            fresh_loss, finals[row] = model.sequence_loss(doc)
            fresh_loss.backward()
            total += float(fresh_loss.detach()) * n
            count += n
            for name, g in grads(model).items():
                mixed[name] = mixed.get(name, 0) + g * n
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-5)
    assert set(packed) == set(mixed)
    for name in mixed:
        assert relative_error(packed[name], mixed[name] / count) < 1e-5, name
    for row, final in finals.items():
        assert relative_error(memory[row], final[0]) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_reset_equals_a_fresh_segment(arch: str) -> None:
    model = make_model(arch, dropout=0.0).eval()
    ids = torch.randint(0, V, (3, 2 * L), generator=torch.Generator().manual_seed(2))
    seg, nxt = ids[:, :L], ids[:, L:]
    carried = model(seg).memory
    reset = torch.tensor([True, False, True])
    out = model(nxt, memory=carried, labels=seg, reset=reset)
    fresh = model(nxt[reset], labels=seg[reset])
    kept = model(nxt[~reset], memory=carried[~reset], labels=seg[~reset])
    torch.testing.assert_close(out.memory[reset], fresh.memory)
    torch.testing.assert_close(out.memory[~reset], kept.memory)
    assert out.logits is not None and fresh.logits is not None and kept.logits is not None
    torch.testing.assert_close(out.logits[reset], fresh.logits)
    torch.testing.assert_close(out.logits[~reset], kept.logits)
    # the caller's memory is not modified in place
    torch.testing.assert_close(carried, model(seg).memory)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_reset_gradient_reaches_the_memory_bias(arch: str) -> None:
    """The reset rows read M_0, so their loss differentiates the memory bias; the carried
    memory's reset rows get no gradient."""
    model = make_model(arch, dropout=0.0)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(4))
    memory = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1).requires_grad_()
    out = model(ids, memory=memory, labels=ids, reset=torch.tensor([True, False]))
    assert out.loss is not None
    out.loss.backward()
    assert memory.grad is not None
    assert torch.count_nonzero(memory.grad[0]) == 0 and torch.count_nonzero(memory.grad[1]) > 0
    bias_grad = model.writer.bias.grad
    assert bias_grad is not None and float(bias_grad.norm()) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_reset_rows(arch: str) -> None:
    model = make_model(arch, dropout=0.0).eval()
    g = torch.Generator().manual_seed(6)
    history = torch.randint(0, V, (3, 2 * L), generator=g)
    _, carried = model.sequence_loss(history)
    prompt = torch.randint(0, V, (3, L + 2), generator=g)
    reset = torch.tensor([False, True, True])
    out = model.generate(prompt, 2 * L, carried, reset=reset)
    fresh = model.generate(prompt[reset], 2 * L)
    kept = model.generate(prompt[~reset], 2 * L, carried[~reset])
    assert torch.equal(out[reset], fresh) and torch.equal(out[~reset], kept)
    streamed = torch.stack(list(model.stream(prompt, 3, carried, reset=reset)), 1)
    assert torch.equal(streamed, out[:, :3])


# ----------------------------------------------------------------------------- bad input

SEG = BAD_CALL_MODEL["segment_length"]  # bad_call_env's models: 2 rows, rollouts of 2 segments
FLAGS = torch.tensor([True, False])
COLUMNS = torch.tensor([[True, False], [False, True]])

RESET_CASES = [
    Case("forward-reset-shape", lambda e: e.dec(e.seg, e.memory, reset=torch.ones(3).bool()),
         ValueError, ("reset must have shape [2] [B]", "got [3]")),
    Case("forward-reset-float", lambda e: e.dec(e.seg, e.memory, reset=FLAGS.float()),
         TypeError, ("reset must be a bool tensor", "torch.float32")),
    Case("forward-reset-int", lambda e: e.encdec(e.seg, e.memory, reset=FLAGS.long()),
         TypeError, ("reset must be a bool tensor", "torch.int64")),
    Case("forward-reset-device", lambda e: e.dec(e.seg, e.memory, reset=FLAGS.to(META)),
         ValueError, ("reset must be on the model's device cpu", "meta")),
    Case("forward-reset-not-tensor", lambda e: e.dec(e.seg, e.memory, reset=[True, False]),
         TypeError, ("reset must be a torch.Tensor or None", "list")),
    Case("sequence-resets-shape", lambda e: e.dec.sequence_loss(e.ids, resets=FLAGS),
         ValueError, ("resets must have shape [2, 2] [B, T]", "got [2]")),
    Case("sequence-resets-per-token", lambda e: e.encdec.sequence_loss(
        e.ids, resets=torch.zeros(2, 2 * SEG, dtype=torch.bool)), ValueError,
         ("resets must have shape [2, 2] [B, T]", "segment_length=4", "got [2, 8]")),
    Case("sequence-resets-int", lambda e: e.dec.sequence_loss(e.ids, resets=COLUMNS.int()),
         TypeError, ("resets must be a bool tensor", "torch.int32")),
    Case("mrbp-resets-shape", lambda e: mrbp.backward(e.dec, e.ids, e.memory, resets=COLUMNS.T[:1]),
         ValueError, ("resets must have shape [2, 2] [B, T]", "got [1, 2]")),
    Case("mrbp-resets-float", lambda e: mrbp.backward(e.encdec, e.ids, resets=COLUMNS.float()),
         TypeError, ("resets must be a bool tensor", "torch.float32")),
    Case("mrbp-resets-device", lambda e: mrbp.backward(e.dec, e.ids, resets=COLUMNS.to(META)),
         ValueError, ("resets must be on the model's device cpu", "meta")),
    Case("generate-reset-shape", lambda e: e.dec.generate(e.seg, 2, e.memory, reset=COLUMNS),
         ValueError, ("reset must have shape [2] [B]", "got [2, 2]")),
    Case("generate-reset-int", lambda e: e.encdec.generate(e.ids, 2, reset=FLAGS.long()),
         TypeError, ("reset must be a bool tensor", "torch.int64")),
]  # fmt: skip


@pytest.fixture(scope="module")
def env() -> SimpleNamespace:
    return bad_call_env()


@pytest.mark.parametrize("case", RESET_CASES, ids=[c.id for c in RESET_CASES])
def test_bad_resets_raise_and_change_nothing(env: SimpleNamespace, case: Case) -> None:
    check_case(env, case)


def test_docs_table_lists_every_reset_case() -> None:
    text = DOCS.read_text()
    missing = [c.id for c in RESET_CASES if f"`{c.id}`" not in text]
    assert not missing, f"cases missing from {DOCS.name}: {missing}"
