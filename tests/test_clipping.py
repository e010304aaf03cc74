"""SpikeClip: the fixed limit of ``clip_grad_norm_`` plus a limit relative to the recent norms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from memformer_fast import SpikeClip


def params_with_grads(*norms: float) -> list[torch.nn.Parameter]:
    """Two parameters (odd shapes) whose gradients have the given total norm, one per call."""
    out = []
    for _ in norms:
        g = torch.randn(3, 5, generator=torch.Generator().manual_seed(len(out)))
        p = torch.nn.Parameter(torch.zeros(3, 5))
        p.grad = g
        out.append(p)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in out]))
    for p, norm in zip(out, norms):
        p.grad.mul_(norm / float(total))
    return out


def feed(clip: SpikeClip, norm: float) -> tuple[float, float]:
    """One update whose gradient has total norm ``norm``: (returned norm, norm after clipping)."""
    p = torch.nn.Parameter(torch.zeros(7))
    p.grad = torch.full((7,), norm / math.sqrt(7))
    returned = float(clip([p]))
    return returned, float(p.grad.norm())


def test_first_update_is_clip_grad_norm() -> None:
    a, b = params_with_grads(3.0, 4.0), params_with_grads(3.0, 4.0)
    expected = torch.nn.utils.clip_grad_norm_(a, 1.0)
    got = SpikeClip(max_norm=1.0)(b)
    assert torch.allclose(got, expected)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb.grad, pa.grad)


def test_without_a_factor_it_is_clip_grad_norm_at_every_update() -> None:
    clip = SpikeClip(max_norm=1.0, factor=math.inf)
    for norm in (5.0, 0.01, 0.01, 80.0, 0.3):
        returned, after = feed(clip, norm)
        assert returned == pytest.approx(norm, rel=1e-5)
        assert after == pytest.approx(min(norm, 1.0), rel=1e-5)


def test_a_single_spike_is_clipped_to_the_recent_norms() -> None:
    """A solved model's gradients are tiny; one batch's spike of 76 (seen in a run that then lost
    its recall at T = 16) reaches the optimizer at 4x the recent norms, not at 1.0."""
    clip = SpikeClip(max_norm=1.0, factor=4.0)
    for _ in range(60):
        feed(clip, 0.01)
    assert clip.running_norm == pytest.approx(0.01, rel=0.05)
    returned, after = feed(clip, 76.0)
    assert returned == pytest.approx(76.0, rel=1e-5)  # the raw norm, for logging
    assert after == pytest.approx(0.04, rel=0.05)
    # One spike moves the limit by (factor - 1) x (1 - momentum) = 30%, not 100x.
    assert clip.limit == pytest.approx(4 * (0.9 * 0.01 + 0.1 * 0.04), rel=0.05)


def test_a_lasting_rise_passes_within_twenty_updates() -> None:
    """A new curriculum stage raises the gradient for good: the limit follows it (x1.3 per update
    at factor 4, momentum 0.9) up to the fixed limit, so learning is slowed, not stopped."""
    clip = SpikeClip(max_norm=1.0, factor=4.0)
    for _ in range(60):
        feed(clip, 0.01)
    after = [feed(clip, 40.0)[1] for _ in range(20)]
    assert all(b >= a for a, b in itertools.pairwise(after))
    assert after[0] < 0.05 and after[-1] == pytest.approx(1.0, rel=1e-5)


def test_a_non_finite_gradient_changes_nothing() -> None:
    clip = SpikeClip()
    feed(clip, 0.5)
    before = clip.state_dict()
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    grad = p.grad.clone()
    assert not torch.isfinite(clip([p]))
    assert torch.equal(p.grad.isnan(), grad.isnan()) and p.grad[0] == 1.0
    assert clip.state_dict() == before


@pytest.mark.parametrize("first", [0.0, 4e-20])
def test_a_zero_or_vanishing_gradient_does_not_set_the_limit(first: float) -> None:
    """An all-zero or vanishing gradient norm is neither clipped nor averaged in: averaged in,
    a zero would clip every later gradient to norm 0 for good (limit min(1, 4 * 0))."""
    clip = SpikeClip(max_norm=1.0, factor=4.0)
    assert feed(clip, first) == pytest.approx((first, first), rel=1e-5, abs=0)
    assert clip.running_norm is None and clip.limit == 1.0
    _, after = feed(clip, 0.5)
    assert after == pytest.approx(0.5, rel=1e-5) and clip.running_norm == pytest.approx(0.5)
    feed(clip, 0.0)  # later too: a zero gradient does not drag the mean down
    assert clip.running_norm == pytest.approx(0.5)
    stuck = SpikeClip()
    stuck.load_state_dict({"running_norm": 0.0})  # a state saved while stuck: no limit of 0
    assert stuck.limit == 1.0 and feed(stuck, 0.3)[1] == pytest.approx(0.3, rel=1e-5)


def test_no_gradients_is_a_zero_norm() -> None:
    clip = SpikeClip()
    assert float(clip([torch.nn.Parameter(torch.zeros(2))])) == 0.0


def test_state_dict_resumes_exactly() -> None:
    a = SpikeClip()
    for norm in (3.0, 0.2, 0.05):
        feed(a, norm)
    b = SpikeClip()
    b.load_state_dict(a.state_dict())
    assert feed(a, 9.0) == feed(b, 9.0) and a.state_dict() == b.state_dict()


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (dict(max_norm=0.0), "max_norm must be > 0 (inf: no fixed limit), got 0.0"),
        (dict(max_norm=float("nan")), "max_norm must be > 0"),
        (dict(factor=0.5), "factor must be >= 1 (inf: no relative limit), got 0.5"),
        (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError) as info:
        SpikeClip(**kwargs)
    assert says in str(info.value)


@pytest.mark.parametrize(
    "state, says",
    [
        ({"running_norm": -1.0}, "state['running_norm'] must be None or a finite float >= 0"),
        ({"running_norm": float("inf")}, "state['running_norm'] must be None or a finite"),
        ({"running_norm": "0.1"}, "got '0.1'"),
        ({}, "state must be a dict with the key 'running_norm', got {}"),
        ({"running_norm": 0.1, "x": 1}, "state must be a dict with the key 'running_norm'"),
    ],
)
def test_bad_state_is_refused_and_changes_nothing(state: dict, says: str) -> None:
    clip = SpikeClip()
    feed(clip, 0.3)
    before = clip.state_dict()
    with pytest.raises(ValueError) as info:
        clip.load_state_dict(state)
    assert says in str(info.value)
    assert clip.state_dict() == before
