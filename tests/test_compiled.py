"""``mrbp.backward(..., compile=...)``: the segment step through ``torch.compile(fullgraph=True)``.

MRBP compiled equals BPTT (eager) with dropout on, padding, -100 labels and a ragged last segment,
for both architectures; Dynamo compiles once per situation (no-grad critical path, replay, ragged
last segment...), never once per segment, and a second call compiles nothing. Inductor on this CPU
takes tens of seconds per graph, so the matrix runs on ``aot_eager`` (the same full graphs through
AOTAutograd, without code generation; about 25 s a test here) and one test runs inductor itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from testing_utils import relative_error, tiny_model
from torch._dynamo.utils import counters

from memformer_fast import Memformer, compiled, mrbp

SEG = 6


def make_model(arch: str, dropout: float = 0.1) -> Memformer:
    return tiny_model(
        arch, vocab_size=29, d_model=16, n_heads=2, d_ff=32, n_memory_slots=4,
        segment_length=SEG, dropout=dropout,
    ).train()  # fmt: skip


def rollout(T: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, a mask padding the end of the second row, labels with one -100: ``[2, T*SEG+extra]``."""
    ids = torch.randint(0, 29, (2, T * SEG + extra), generator=torch.Generator().manual_seed(T))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[0, SEG + 1] = -100
    return ids, mask, labels


def grads(model: Memformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(compiled, "BACKEND", request.param)
    torch._dynamo.reset()
    counters.clear()
    yield request.param
    torch._dynamo.reset()


def check_equals_bptt(model: Memformer, T: int, extra: int) -> None:
    ids, mask, labels = rollout(T, extra)
    torch.manual_seed(1)
    loss, memory = model.sequence_loss(ids, attention_mask=mask, labels=labels)
    loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same rollout seed: the same dropout masks
    result = mrbp.backward(model, ids, attention_mask=mask, labels=labels, compile=True)
    actual = grads(model)
    model.zero_grad(set_to_none=True)
    assert actual.keys() == expected.keys()
    worst = max(relative_error(actual[n], expected[n]) for n in expected)
    assert worst < 1e-5, worst
    torch.testing.assert_close(result.loss, loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.memory, memory.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_compiled_mrbp_equals_bptt_and_compiles_once_per_situation(arch: str, backend: str):
    model = make_model(arch)
    check_equals_bptt(model, T=4, extra=2)  # a ragged last segment
    graphs = counters["stats"]["unique_graphs"]
    # critical path (no grad), replay of the critical path, decoder and loss, each once more for
    # the ragged segment (whose encoder-decoder step decodes nothing), whatever T (5 segments
    # here; the longer rollout below adds none)
    assert graphs == (6 if arch == "decoder" else 5), graphs
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
    dropout, padding and -100 labels; three graphs for any number of segments."""
    model = make_model("decoder")
    check_equals_bptt(model, T=3, extra=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3, graphs
    check_equals_bptt(model, T=5, extra=0)
    assert counters["stats"]["unique_graphs"] == graphs
