"""``mrbp.backward(..., compile=...)``: the segment step through ``torch.compile(fullgraph=True)``.

MRBP compiled equals BPTT (eager) with dropout on, padding, -100 labels and a ragged last segment,
for both architectures; Dynamo compiles once per situation (no-grad critical path, replay, ragged
last segment...), never once per segment, and a second call compiles nothing. Inductor on this CPU
takes tens of seconds per graph, so the matrix runs on ``aot_eager`` (the same full graphs through
AOTAutograd, without code generation; about 25 s a test here) and one test runs inductor itself.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from testing_utils import (
    CLI_TEXT,
    TINY_CLI,
    assert_mrbp_equals_bptt,
    grads,
    make_model,
    relative_error,
    run,
)
from torch._dynamo.utils import counters

from memformer_fast import Memformer, compiled, mrbp

SEG = 6


make_model = functools.partial(
    make_model, vocab_size=29, d_model=16, n_heads=2, d_ff=32, n_memory_slots=4,
    segment_length=SEG, dropout=0.1,
)  # fmt: skip


def rollout(T: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, a mask padding the end of the second row, labels with one -100: ``[2, T*SEG+extra]``."""
    ids = torch.randint(0, 29, (2, T * SEG + extra), generator=torch.Generator().manual_seed(T))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[0, SEG + 1] = -100
    return ids, mask, labels


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(compiled, "BACKEND", request.param)
    torch._dynamo.reset()
    counters.clear()
    yield request.param
    torch._dynamo.reset()


def check_equals_bptt(model: Memformer, T: int, extra: int) -> None:
    ids, mask, labels = rollout(T, extra)
    assert_mrbp_equals_bptt(
        model, ids, tol=1e-5, seed=1, options={"compile": True}, attention_mask=mask, labels=labels
    )
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_compiled_mrbp_equals_bptt_and_compiles_once_per_situation(arch: str, backend: str):
    model = make_model(arch)
    check_equals_bptt(model, T=4, extra=2)  # a ragged last segment
    graphs = counters["stats"]["unique_graphs"]
    # critical path (no grad), replay of the critical path (the last replayed segment's without
    # the writer: its memory gets no gradient), decoder and loss, for a full and the ragged
    # segment, whatever T (5 segments here; the longer rollout below adds none). Decoder: the
    # ragged segment is the last replayed one; encoder-decoder: segment 3, which decodes it.
    assert graphs == 6, graphs
    check_equals_bptt(model, T=4, extra=2)  # a second call: nothing new to compile
    check_equals_bptt(model, T=6, extra=2)  # a longer rollout: no graph per segment either
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_compiled_mrbp_without_dropout_and_in_eval(backend: str):
    model = make_model("encoder-decoder", dropout=0.0)
    check_equals_bptt(model, T=3, extra=0)
    model.eval()
    check_equals_bptt(model, T=3, extra=0)


def test_compile_argument_is_checked():
    model = make_model("decoder")
    ids = rollout(2, 0)[0]
    for bad in ("fast", 1, None):
        with pytest.raises(ValueError, match="compile must be a bool or one of"):
            mrbp.backward(model, ids, compile=bad)
    with pytest.raises(ValueError, match="would replay one dropout mask"):
        mrbp.backward(model, ids, compile="reduce-overhead")
    with pytest.raises(ValueError, match="need a CUDA model"):
        mrbp.backward(model.eval(), ids, compile="reduce-overhead")
    assert all(p.grad is None for p in model.parameters())


def test_inductor_options_per_device():
    """The CPU's generated code calls its kernels from C++ (cpp_wrapper: the launch-bound step's
    Python overhead); CUDA keeps the mode's options as they are (CUDA graphs there)."""
    assert compiled.inductor_options("default", "cpu") == {"cpp_wrapper": True}
    assert compiled.inductor_options("max-autotune-no-cudagraphs", "cpu") == {
        **torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
        "cpp_wrapper": True,
    }
    assert compiled.inductor_options("default", "cuda") == {}
    assert compiled.inductor_options("reduce-overhead", "cuda") == {"triton.cudagraphs": True}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor"], indirect=True)
def test_inductor_compiled_mrbp_equals_bptt(backend: str):
    """Inductor itself (C++ kernels on CPU): equal to BPTT up to its float reordering, with
    dropout, padding and -100 labels; four graphs for any number of segments (the critical path,
    its replay with and without the writer, the decoder and loss)."""
    model = make_model("decoder")
    check_equals_bptt(model, T=3, extra=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 4, graphs
    check_equals_bptt(model, T=5, extra=0)
    assert counters["stats"]["unique_graphs"] == graphs


# A compiled loop accepts every layout eager does (padding appearing, resets,
# a carried memory, ragged lengths), with a bounded number of graphs and no hard failure.
LAYOUTS = [  # (extra tokens, a padded row, resets, a carried memory that needs no grad)
    (0, False, False, False), (0, True, False, False), (0, False, True, False),
    (0, False, False, True), (0, True, True, True), (2, False, False, False),
    (2, True, True, True), (3, False, True, False),
]  # fmt: skip


def layout(index: int, extra: int, pad: bool, reset: bool) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + index)
    ids = torch.randint(0, 29, (2, 3 * SEG + extra), generator=g)
    mask = None
    if pad:
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
    resets = None
    if reset:
        resets = torch.zeros(2, -(-ids.shape[1] // SEG), dtype=torch.bool)
        resets[0, 1] = True
    return {"input_ids": ids, "attention_mask": mask, "resets": resets}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_compiled_mrbp_takes_every_layout_eager_takes(backend: str):
    """Eight layouts in one loop (Dynamo's default limit of graphs per function is 8, which
    ``fullgraph=True`` turned into a FailOnRecompileLimitHit at the fifth call): every call
    equals BPTT, and the graphs stay few."""
    model = make_model("decoder")
    memory = model.init_memory(2).detach()
    for i, (extra, pad, reset, carry) in enumerate(LAYOUTS):
        inputs = layout(i, extra, pad, reset)
        m = memory if carry else None
        torch.manual_seed(i)
        loss, _ = model.sequence_loss(memory=m, **inputs)
        loss.backward()
        expected = grads(model)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        result = mrbp.backward(model, memory=m, compile=True, **inputs)
        actual = grads(model)
        model.zero_grad(set_to_none=True)
        assert actual.keys() == expected.keys()
        assert max(relative_error(actual[n], expected[n]) for n in expected) < 1e-5, i
        torch.testing.assert_close(result.loss, loss.detach(), rtol=1e-5, atol=0)
    # critical path, replay, decoder and loss; padded or not; ragged or not (two lengths)
    assert counters["stats"]["unique_graphs"] <= 3 * 2 * 3, counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_train_compile_with_file_boundaries_runs(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """``train --compile --reset-at-file-boundaries`` died with a Dynamo traceback ("recompile
    limit (8) ... 'memory' requires_grad mismatch") before its first save."""
    for i in range(5):
        (tmp_path / f"f{i}.py").write_bytes(CLI_TEXT[: 300 + 170 * i])
    out = tmp_path / "run"
    code, stdout, err = run(
        capsys, "train", str(tmp_path), "--out", str(out), *TINY_CLI, "--threads", "1",
        "--steps", "6", "--compile", "--reset-at-file-boundaries", "--eval-every", "100",
        "--val-fraction", "0.2",
    )  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err and "done: step 6" in stdout
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
def test_compiled_step_past_the_limit_runs_eagerly(backend: str, monkeypatch):
    """Past ``RECOMPILE_LIMIT`` graphs a step runs eagerly: one warning, the same gradients."""
    monkeypatch.setattr(compiled, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(compiled, "_WARNED", set())
    model = make_model("decoder")
    ids = rollout(2, 0)[0]
    torch.manual_seed(0)
    mrbp.backward(model, ids)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        pytest.warns(RuntimeWarning, match="new layouts run eagerly"),
    ):
        mrbp.backward(model, ids, compile=True)  # the replay needs a second graph of encode
    actual = grads(model)
    assert all(relative_error(actual[n], expected[n]) < 1e-6 for n in expected)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize(("arch", "T"), [("decoder", 1), ("encoder-decoder", 2)])
def test_compiled_mrbp_leaves_unreached_grads_none(backend: str, arch: str, T: int):
    """The writer's output gets no gradient in these rollouts (its memory is never read again),
    so eager MRBP and BPTT leave its parameters' ``.grad`` None; so must a compiled graph (zero
    tensors instead would change what AdamW's weight decay and state do)."""
    model = make_model(arch, dropout=0.0)
    ids = torch.randint(0, 29, (2, T * SEG), generator=torch.Generator().manual_seed(T))
    model.sequence_loss(ids)[0].backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    mrbp.backward(model, ids, compile=True)
    actual = grads(model)
    assert "writer.q.weight" not in expected
    assert actual.keys() == expected.keys()
    assert max(relative_error(actual[n], expected[n]) for n in expected) < 1e-5
