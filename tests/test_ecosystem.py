"""The package among the tools users already run: autocast, torch.compile, determinism.

DDP lives in ``test_distributed.py``. The compile tests are marked ``slow``: Inductor compiles C++
on CPU, which takes about a minute per graph on two cores, so only one layer goes through it and
the rest use ``backend="aot_eager"``, which still captures the full graph (``fullgraph=True``
fails on any graph break) and runs it through AOTAutograd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from testing_utils import assert_mrbp_equals_bptt, grads, make_model, relative_error

from memformer_fast import Memformer, functional, mrbp
from memformer_fast.layers import DecoderBlock, MemoryBlock, MemoryReader, MemoryWriter

VOCAB, WIDTH, SLOTS, SEG = 29, 32, 4, 6


make_model = functools.partial(
    make_model, vocab_size=VOCAB, d_model=WIDTH, n_heads=4, d_ff=64, n_memory_slots=SLOTS,
    segment_length=SEG, dropout=0.0,
)  # fmt: skip


def rollout(B: int = 3, T: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T * SEG), generator=g)


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------ autocast


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_autocast_keeps_the_memory_in_memory_dtype(arch: str) -> None:
    model, ids = make_model(arch), rollout()
    with bf16_autocast():
        out = model(ids[:, :SEG], labels=ids[:, SEG : 2 * SEG])
        loss, memory = model.sequence_loss(ids)
        result = mrbp.backward(model, ids)
    assert out.logits is not None and out.logits.dtype == torch.bfloat16
    assert out.memory.dtype == memory.dtype == result.memory.dtype == torch.float32
    assert loss.dtype == result.loss.dtype == torch.float32
    norms = torch.linalg.vector_norm(result.memory, dim=-1)  # BMN in float32: unit slots
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_mrbp_under_autocast_matches_bptt_under_autocast(arch: str) -> None:
    model, ids = make_model(arch), rollout()
    with bf16_autocast():
        assert_mrbp_equals_bptt(model, ids, tol=1e-2)


def train(model: Memformer, data: list[torch.Tensor], autocast: bool) -> list[float]:
    """A few AdamW steps of MRBP training; the losses seen."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in data:
        opt.zero_grad(set_to_none=True)
        if autocast:
            with bf16_autocast():
                result = mrbp.backward(model, ids)
        else:
            result = mrbp.backward(model, ids)
        opt.step()
        losses.append(result.loss.item())
    return losses


def test_training_under_autocast_tracks_float32() -> None:
    data = [rollout(seed=s % 2) for s in range(8)]  # two rollouts, seen four times each
    fp32, bf16 = make_model(), make_model()
    losses32, losses16 = train(fp32, data, False), train(bf16, data, True)
    assert losses32[-1] < losses32[0] - 0.1 and losses16[-1] < losses16[0] - 0.1  # both learn
    for l32, l16 in zip(losses32, losses16):
        assert abs(l16 - l32) < 0.01 * l32, (losses32, losses16)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    flat32 = torch.cat([p.detach().flatten() for p in fp32.parameters()])
    flat16 = torch.cat([p.detach().flatten() for p in bf16.parameters()])
    assert relative_error(flat16, flat32) < 0.01


# ------------------------------------------------------------------ torch.compile


def layers() -> Iterator[tuple[str, torch.nn.Module, Callable[[], tuple[torch.Tensor, ...]]]]:
    """Each layer with a function making fresh inputs that require grad."""
    torch.manual_seed(3)
    B, L = 2, 5
    mask = torch.tensor([[True] * L, [True, True, True, False, False]])

    def hidden_and_memory():
        return torch.randn(B, L, WIDTH, requires_grad=True), torch.randn(
            B, SLOTS, WIDTH, requires_grad=True
        )

    yield "reader", MemoryReader(WIDTH, 4, backend="reference"), hidden_and_memory
    writer = MemoryWriter(WIDTH, 4, SLOTS, backend="reference")
    yield "writer", writer, lambda: (*reversed(hidden_and_memory()), mask)
    block = MemoryBlock(WIDTH, 4, 64, 0.0, "reference", causal=True)
    yield "memory-block", block, lambda: (*hidden_and_memory(), None)
    decoder = DecoderBlock(WIDTH, 4, 64, 0.0)
    yield "decoder-block", decoder, lambda: (*hidden_and_memory()[:1], torch.randn(B, 7, WIDTH),
                                             None, None)  # fmt: skip


def assert_same_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal gradients; AOTAutograd gives zeros where eager leaves ``.grad`` None (a parameter the
    loss does not reach, such as the writer's when only the logits are scored)."""
    for name in actual.keys() | expected.keys():
        reference = expected.get(name, torch.zeros_like(actual.get(name, torch.empty(0))))
        torch.testing.assert_close(
            actual.get(name, torch.zeros_like(reference)), reference, msg=name
        )


def same_forward_and_backward(
    module: torch.nn.Module, compiled: Callable, make_inputs: Callable[[], tuple]
) -> None:
    torch.manual_seed(4)
    inputs = make_inputs()
    twins = tuple(
        t.detach().clone().requires_grad_(t.requires_grad) for t in inputs if t is not None
    )
    expected = module(*inputs)
    grad_out = torch.randn_like(expected)
    expected.backward(grad_out)
    eager = grads(module), [t.grad for t in inputs if t is not None and t.requires_grad]
    module.zero_grad(set_to_none=True)
    it = iter(twins)
    actual = compiled(*(None if t is None else next(it) for t in inputs))
    actual.backward(grad_out)
    torch.testing.assert_close(actual, expected)
    assert_same_grads(grads(module), eager[0])
    for g, g_eager in zip([t.grad for t in twins if t.requires_grad], eager[1]):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.slow
def test_compile_fullgraph_on_each_layer() -> None:
    torch._dynamo.reset()
    for _name, module, make_inputs in layers():
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        same_forward_and_backward(module, compiled, make_inputs)


@pytest.mark.slow
def test_compile_fullgraph_inductor_memory_writer() -> None:
    """The one Inductor compile: the writer holds both fused ops (write and gated update)."""
    torch._dynamo.reset()
    _name, module, make_inputs = next(layer for layer in layers() if layer[0] == "writer")
    compiled = torch.compile(module, fullgraph=True)
    same_forward_and_backward(module, compiled, make_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_compile_model_and_mrbp_with_compiled_layers(arch: str) -> None:
    """``torch.compile(model)`` matches eager (forward, loss, gradients); MRBP, which drives the
    model through its layers rather than ``forward``, runs compiled layers compiled in place."""
    torch._dynamo.reset()
    model, ids = make_model(arch), rollout(T=2)
    seg, nxt = ids[:, :SEG], ids[:, SEG:]
    labels = nxt if arch == "encoder-decoder" else seg
    expected = model(seg, labels=labels)
    assert expected.loss is not None and expected.logits is not None
    expected.loss.backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    actual = torch.compile(model, backend="aot_eager")(seg, labels=labels)
    assert actual.loss is not None and actual.logits is not None
    actual.loss.backward()
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.memory, expected.memory)
    assert_same_grads(grads(model), eager)

    model.zero_grad(set_to_none=True)
    mrbp.backward(model, ids)
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    for layer in [*model.blocks, model.writer, *model.decoder]:
        layer.compile(fullgraph=True, backend="aot_eager")
    mrbp.backward(model, ids)
    assert_same_grads(grads(model), eager)


# ------------------------------------------------------------------ determinism


@pytest.fixture
def deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_bptt_and_mrbp_are_bitwise_reproducible(arch: str, deterministic: None) -> None:
    """Same seed, same everything, to the bit: ops, BPTT and MRBP, dropout on."""
    ids = rollout()

    def run(step: Callable[[Memformer], torch.Tensor]) -> tuple[torch.Tensor, dict]:
        model = make_model(arch, dropout=0.1).train()
        torch.manual_seed(11)
        loss = step(model)
        return loss.detach(), grads(model)

    def bptt(model: Memformer) -> torch.Tensor:
        loss = model.sequence_loss(ids)[0]
        loss.backward()
        return loss

    for step in (bptt, lambda model: mrbp.backward(model, ids).loss):
        (loss1, grads1), (loss2, grads2) = run(step), run(step)
        assert torch.equal(loss1, loss2)
        assert grads1.keys() == grads2.keys()
        for name in grads1:
            assert torch.equal(grads1[name], grads2[name]), name


def test_ops_are_bitwise_reproducible(deterministic: None) -> None:
    def run() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(2, 7, 2, 8, generator=g, requires_grad=True) for _ in range(3))
        m, c, gl = (torch.randn(2, 3, 16, generator=g, requires_grad=True) for _ in range(3))
        qs, ks, vs = (torch.randn(2, 3, 2, 8, generator=g, requires_grad=True) for _ in range(3))
        bias = torch.randn(3, 16, generator=g, requires_grad=True)
        outs = [
            functional.memory_read_attention(q, k[:, :3], v[:, :3]),
            functional.memory_write_attention(qs, ks, vs, k, v, temperature=0.5),
            functional.gated_memory_update(m, c, bias, gl),
        ]
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g) for o in outs])
        leaves = (q, k, v, m, c, gl, qs, ks, vs, bias)
        return [o.detach() for o in outs] + [t.grad for t in leaves if t.grad is not None]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
