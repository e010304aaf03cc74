"""Dropout randomness private to the call: generators owned by BPTT, MRBP and the replay."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest
import torch
from testing_utils import grads, make_model, relative_error

from memformer_fast import Memformer, mrbp, randomness

ARCHS = ["decoder", "encoder-decoder"]


make_model = functools.partial(
    make_model, vocab_size=31, n_memory_slots=4, segment_length=6, dropout=0.2
)


def ids_for(T: int = 4, B: int = 3) -> torch.Tensor:
    return torch.randint(0, 31, (B, 6 * T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_mrbp_equals_bptt_while_another_thread_draws(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread drawing from the global generator in a loop during two ``mrbp.backward`` calls: the
    gradients still equal BPTT's, and the thread never sees a number twice (the call does not
    reseed the process-wide generator)."""
    # The rollout seed is the one global draw of a rollout: pinned, so the thread's draws cannot
    # race with it (what this test is about is every draw after it).
    monkeypatch.setattr(randomness, "rollout_seed_tensor", lambda: torch.tensor([987654321]))
    model, ids = make_model(arch), ids_for(T=3)
    model.sequence_loss(ids)[0].backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    seen: list[int] = []
    started, stop = threading.Event(), threading.Event()

    def draw() -> None:
        while not stop.is_set():
            seen.extend(torch.randint(0, 2**62, (4,)).tolist())  # 62 bits: no chance collisions
            started.set()
            time.sleep(1e-4)  # interleave with the main thread without starving it of the GIL

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        started.wait(10)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            mrbp.backward(model, ids)
            actual = grads(model)
            assert actual.keys() == expected.keys()
            worst = max(relative_error(actual[n], expected[n]) for n in expected)
            assert worst < 1e-5, worst
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 100
    assert len(set(seen)) == len(seen), f"{len(seen) - len(set(seen))} repeated draws"


@pytest.mark.parametrize("arch", ARCHS)
def test_mrbp_and_bptt_draw_once_from_the_global_generator(arch: str) -> None:
    """Every dropout mask comes from a generator of the call: the global generator advances by
    exactly the rollout seed's one draw, and its state is not reset to anything else."""
    model, ids = make_model(arch), ids_for()
    torch.manual_seed(3)
    randomness.draw_rollout_seed()
    expected = torch.rand(8)
    for run in (lambda: model.sequence_loss(ids)[0].backward(), lambda: mrbp.backward(model, ids)):
        torch.manual_seed(3)
        run()
        assert torch.equal(torch.rand(8), expected)


def test_seeded_is_private_and_nests() -> None:
    """``seeded`` yields its own generator and restores the enclosing one; the global generator
    is never touched; ``seed=None`` means the global generator even inside another call."""
    x = torch.ones(1000)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with randomness.seeded(5, torch.device("cpu")) as g:
        assert isinstance(g, torch.Generator) and g.initial_seed() == 5
        a = randomness.dropout(x, 0.5)
        with randomness.seeded(None, torch.device("cpu")) as inner:
            assert inner is None
            torch.manual_seed(1)
            global_draw = randomness.dropout(x, 0.5)
        b = randomness.dropout(x, 0.5)
    torch.set_rng_state(state)
    with randomness.seeded(5, torch.device("cpu")):
        assert torch.equal(randomness.dropout(x, 0.5), a)
        assert torch.equal(randomness.dropout(x, 0.5), b)
    torch.manual_seed(1)
    assert torch.equal(randomness.dropout(x, 0.5), global_draw)
    assert set(a.unique().tolist()) == {0.0, 2.0} and not torch.equal(a, b)
    assert torch.equal(randomness.dropout(x, 0.5, training=False), x)


def test_dropout_module_matches_nn_dropout_statistics_and_gradient() -> None:
    layer = randomness.Dropout(0.25)
    assert isinstance(layer, torch.nn.Dropout) and layer.state_dict() == {}
    x = torch.randn(200, 200, requires_grad=True)
    with randomness.seeded(11, torch.device("cpu")):
        y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    layer.eval()
    assert layer(x) is x


@pytest.mark.slow
def test_compiled_layers_with_dropout_match_eager_mrbp() -> None:
    """Dropout stays compilable with fullgraph=True: compiled layers give MRBP the same masks,
    hence the same gradients, as eager."""
    torch._dynamo.reset()
    model, ids = make_model("encoder-decoder"), ids_for(T=2)
    torch.manual_seed(4)
    mrbp.backward(model, ids)
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    for layer in [*model.blocks, model.writer, *model.decoder]:
        layer.compile(fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    mrbp.backward(model, ids)
    compiled = grads(model)
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_rejected_rollout_leaves_the_global_generator_alone(arch: str) -> None:
    """The plan draws the rollout seed before its one host read of the values: when those reject
    the input (ids or labels out of range, nothing to predict), the draw is undone."""
    model, ids = make_model(arch), ids_for()
    bad_ids = ids.clone()
    bad_ids[0, 0] = 31
    bad_labels = ids.clone()
    bad_labels[1, 2] = 99
    cases = [
        (lambda: mrbp.backward(model, bad_ids), ValueError, "input_ids must hold ids in"),
        (lambda: mrbp.backward(model, ids, labels=bad_labels), ValueError, "labels must be"),
        (lambda: mrbp.backward(model, ids, labels=ids * 0 - 100), ValueError, "no token"),
        (lambda: model.sequence_loss(bad_ids), ValueError, "input_ids must hold ids in"),
    ]
    assert_refused_without_a_draw(model, cases)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_refusal_leaves_the_global_generator_alone(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call refused after the rollout seed was drawn (a memory of another shape, a memory or
    loss that is not finite, an exception in the middle of the replay), not only by the plan's
    own checks, leaves the global generator where it was."""
    model, ids = make_model(arch), ids_for()
    nan_memory = model.init_memory(3).detach().clone()
    nan_memory[2, 1, 0] = float("nan")

    def nan_loss() -> None:
        weight = model.lm_head.weight
        kept = weight.detach().clone()
        with torch.no_grad():
            weight[0, 0] = float("nan")  # the logits of token 0 NaN: every loss NaN
        try:
            mrbp.backward(model, ids)
        finally:
            with torch.no_grad():
                weight.copy_(kept)

    def interrupted() -> None:
        real = model.rollout_step

        def step(rollout, t, memory, seed=None, with_loss=True):  # type: ignore[no-untyped-def]
            if with_loss and t == 1:
                raise KeyboardInterrupt
            return real(rollout, t, memory, seed, with_loss)

        with monkeypatch.context() as patch:
            patch.setattr(model, "rollout_step", step)
            mrbp.backward(model, ids)

    cases = [
        (lambda: mrbp.backward(model, ids, nan_memory[:2]), ValueError, "memory must have shape"),
        (lambda: mrbp.backward(model, ids, nan_memory), FloatingPointError, "not finite"),
        (nan_loss, FloatingPointError, "the loss of segment"),
        (interrupted, KeyboardInterrupt, ""),
        (lambda: model.sequence_loss(ids, nan_memory), ValueError, "memory must be finite"),
        (lambda: model.sequence_loss(ids, nan_memory[:1]), ValueError, "memory must have shape"),
    ]
    assert_refused_without_a_draw(model, cases)


Refusal = tuple[Callable[[], object], type[BaseException], str]


def assert_refused_without_a_draw(model: Memformer, cases: list[Refusal]) -> None:
    """Each ``(call, error, message)`` raises ``error`` matching ``message`` and leaves the global
    generator where it was and every ``.grad`` None."""
    for run, error, message in cases:
        torch.manual_seed(4)
        expected = torch.rand(4)
        torch.manual_seed(4)
        with pytest.raises(error, match=message or None):
            run()
        assert torch.equal(torch.rand(4), expected), message
        assert all(p.grad is None for p in model.parameters())
