"""Memory Replay Back-Propagation (the paper's Algorithm 1; docs/design.md).

MRBP trains through a whole rollout while keeping the activations of one segment alive:

1. a no-grad pass along the critical path (blocks and memory writer; the decoder, LM head and loss
   are skipped) pushes ``M_0 .. M_{T-1}`` and each segment's dropout seed into a replay buffer;
2. walking back from the last segment, each segment is replayed with grad from its stored memory
   and ONE ``torch.autograd.grad([loss_t, M_{t+1}], params + [M_t], [1, G_{t+1}])`` call gives
   the parameters' gradients (summed over the segments with ``torch._foreach_add_``, added into
   ``.grad`` only once every check passed) and ``G_t``.

Gradients equal those of ``model.sequence_loss(...).backward()`` up to float rounding, dropout
included, because both derive every segment's randomness from the same seeds.

Under ``DistributedDataParallel`` the replay runs on the wrapped module, outside DDP's reducer, and
the gradients are averaged over the ranks ONCE per rollout, after the last backward call, by one
pass through the DDP wrapper (see :func:`_synchronize`).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import compiled, randomness
from .model import Memformer
from .replay import ReplayBuffer
from .rollout import Rollout
from .validation import check_memory

NO_SEED = -1  # a replay-buffer entry whose segment draws no dropout


@dataclass
class MRBPResult:
    """``loss``: the rollout's mean cross-entropy (detached, as ``sequence_loss`` defines it);
    ``memory``: ``M_T`` (detached), to carry into the next rollout; ``num_segments``: ``T``."""

    loss: Tensor
    memory: Tensor
    num_segments: int


def _unwrap(model: nn.Module) -> Memformer:
    inner = getattr(model, "module", model)  # DistributedDataParallel and similar wrappers
    if not isinstance(inner, Memformer):
        raise TypeError(f"model must be a Memformer (or wrap one), got {type(inner).__name__}")
    if _sharded(model):
        raise TypeError(
            "mrbp.backward does not support FSDP (sharded parameters): it drives the model's "
            "parts outside forward(), where FSDP keeps them sharded. Use DistributedDataParallel, "
            "or BPTT (sequence_loss) with FSDP; see docs/robustness.md"
        )
    return inner


def _refuse_post_accumulate_hooks(net: Memformer) -> None:
    """Refuse parameters with gradient hooks: ``register_post_accumulate_grad_hook`` hooks and
    plain ``register_hook`` hooks.

    MRBP accumulates each gradient over one backward call per segment, into ``.grad`` tensors it
    swaps in and out to stay atomic: a post-accumulate hook (the optimizer-in-backward pattern)
    would fire once per segment on a partial gradient, and before the finiteness checks; a plain
    hook would see each segment's partial gradient, so a non-linear one (a clamp) gives another
    gradient than under BPTT, where it sees the whole gradient once.
    """
    for name, p in net.named_parameters():
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise RuntimeError(
                f"mrbp.backward: parameter {name!r} has a post-accumulate-grad hook "
                "(register_post_accumulate_grad_hook); MRBP runs one backward call per segment, "
                "so it would fire once per segment on a partial gradient. Remove the hooks and "
                "act on .grad after mrbp.backward returns, or train with sequence_loss (BPTT)"
            )
        if getattr(p, "_backward_hooks", None):
            raise RuntimeError(
                f"mrbp.backward: parameter {name!r} has a gradient hook (register_hook); MRBP "
                "runs one backward call per segment, so it would see each segment's partial "
                "gradient (once per segment, not once per rollout as under BPTT). Remove the "
                "hooks and act on .grad after mrbp.backward returns, or train with sequence_loss"
            )


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP-wrapped (FSDP1) or has FSDP2/DTensor-sharded parameters.

    Looked up in ``sys.modules``: a model cannot be sharded by a module nobody imported, and
    importing FSDP here would cost seconds.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(model, fsdp.FullyShardedDataParallel):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())


def backward(
    model: nn.Module,
    input_ids: Tensor,
    memory: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    offload: bool = False,
    preserve_rng: bool = True,
    resets: Tensor | None = None,
    compile: bool | str = False,
) -> MRBPResult:
    """Accumulate the gradient of the rollout loss into the parameters' ``.grad``.

    Args:
        model: a :class:`Memformer`, or a ``DistributedDataParallel`` wrapping one: then the
            gradients are averaged over the ranks once per call (not once per segment), unless
            the call runs inside ``model.no_sync()``.
        input_ids: ``[B, T*L]`` token ids (the last segment may be shorter).
        memory: ``M_0 [B, S, D]``, default ``model.init_memory(B)`` (then the memory bias gets
            the gradient through ``M_0`` too, as in BPTT). If it requires grad, its gradient is
            accumulated as well.
        attention_mask: ``[B, T*L]``, 1/True for real tokens.
        labels: ``[B, T*L]``, default ``input_ids``; -100 is ignored.
        offload: keep the replay buffer in pinned host memory (CUDA).
        preserve_rng: recreate each segment's dropout masks in the replay (exact gradients). With
            False, the replay draws fresh masks: cheaper bookkeeping, approximate gradients.
        resets: ``[B, T]`` bool, ``T`` the number of segments: row ``b``'s memory restarts from
            the initial memory before segment ``t`` where ``resets[b, t]`` (a document starts
            there), as in ``sequence_loss``. The replay buffer keeps the memory each segment
            received; the replay applies the reset again, so the memory bias gets the gradient
            of every reset point and the carried memory none from the reset rows, exactly as in
            BPTT.
        compile: run each segment's step (the critical path without grad, and the replay with
            its backward) through ``torch.compile(fullgraph=True)``
            (:mod:`memformer_fast.compiled`): ``True`` (inductor's default mode), or a mode
            name; ``"reduce-overhead"`` (CUDA graphs) needs CUDA and no dropout in training.
            The first calls compile; gradients equal eager ones up to float reordering.

    Returns:
        :class:`MRBPResult`.

    Raises:
        RuntimeError: a parameter has a gradient hook, plain or post-accumulate (see
            :func:`_refuse_post_accumulate_hooks`); nothing was changed.
        FloatingPointError: a segment's memory or loss is not finite; every ``.grad`` (the
            parameters' and ``memory``'s) is then left exactly as it was before the call. Under
            DDP every rank raises when any rank finds a non-finite value.
    """
    net = _unwrap(model)
    _refuse_post_accumulate_hooks(net)
    ddp = model if isinstance(model, DistributedDataParallel) else None
    for name, flag in (("offload", offload), ("preserve_rng", preserve_rng)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
    mode = compiled.check_mode(compile, net)
    step = net.rollout_step if mode is None else functools.partial(compiled.rollout_step, net, mode)
    replay_step = _eager_replay_step(net) if mode is None else step  # see _eager_replay_step
    with _generator_restored_on_error():  # a refused call has drawn no rollout seed
        rollout = net.plan_rollout(input_ids, attention_mask, labels, resets=resets)
        # A memory that is not finite is refused by the atomic check below (FloatingPointError).
        batch_size = _batch_size(rollout)
        memory_in = None if memory is None else check_memory(net, memory, batch_size, finite=False)
        seeds, buffer = _seeds_and_buffer(net, rollout, preserve_rng, offload)
        final_memory, memory_probes = _critical_path(net, step, rollout, buffer, memory_in, seeds)
        # The replay collects the gradients in tensors of its own, merged into .grad on success.
        params = [p for p in net.parameters() if p.requires_grad]
        losses, grad_memory, grads = _replay(net, replay_step, rollout, buffer, memory_in, params)
        loss = torch.stack(losses.values)  # segments in reverse order
        _check_finite(rollout, memory_probes, losses.steps, loss, ddp, net.device)
    # Only now, with every check passed, does the gradient leave the call: into .grad, and into
    # the caller's memory (and whatever graph produced it).
    _merge(params, grads)
    if memory_in is not None and memory_in.requires_grad and grad_memory is not None:
        torch.autograd.backward(memory_in, grad_memory)
    if ddp is not None and ddp.require_backward_grad_sync:
        _synchronize(ddp, net, params)
    buffer.clear()
    return MRBPResult(loss=loss.sum(), memory=final_memory, num_segments=len(rollout))


@contextlib.contextmanager
def _generator_restored_on_error() -> Iterator[None]:
    """Put the global CPU generator back where it was if the body raises: a refused call (bad
    input, a memory or loss that is not finite, an interruption) leaves no trace, the rollout
    seed's draw included (and, with ``preserve_rng=False``, the dropout masks' draws)."""
    state = torch.default_generator.get_state()
    try:
        yield
    except BaseException:
        torch.default_generator.set_state(state)
        raise


def _seeds_and_buffer(
    net: Memformer, rollout: Rollout, preserve_rng: bool, offload: bool
) -> tuple[list[int], ReplayBuffer]:
    """Each segment's dropout seed (``NO_SEED`` for none) and an empty replay buffer for
    ``M_0 .. M_{T-1}``."""
    num_segments, c = len(rollout), net.config
    seeds = [
        NO_SEED
        if rollout.seed is None or not preserve_rng
        else randomness.segment_seed(rollout.seed, t)
        for t in range(num_segments)
    ]
    shape = (_batch_size(rollout), c.n_memory_slots, c.d_model)
    return seeds, ReplayBuffer(num_segments, shape, c.memory_dtype, net.device, offload)


# Memformer.rollout_step's signature; M_{t+1} is None only for a compiled replay step without
# with_memory.
_Step = Callable[..., tuple[Tensor | None, Tensor | None]]


def _eager_replay_step(net: Memformer) -> _Step:
    """The replay's step in eager mode: ``net.rollout_step`` (a wrapper of that method sees
    every call), which runs the writer whether or not its output gets a gradient (then autograd
    reaches none of the writer's parameters anyway). The compiled step takes ``with_memory``
    and skips the writer then: a graph returns a zero gradient, not None, for a parameter it
    does not reach, so the writer's parameters would get zeros where eager MRBP and BPTT leave
    None (and AdamW would decay them)."""

    def step(
        rollout: Rollout, t: int, memory: Tensor, seed: int | None, with_memory: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        return net.rollout_step(rollout, t, memory, seed)

    return step


def _critical_path(
    net: Memformer,
    step: _Step,
    rollout: Rollout,
    buffer: ReplayBuffer,
    memory_in: Tensor | None,
    seeds: list[int],
) -> tuple[Tensor, list[Tensor]]:
    """Step 1, without grad: push ``M_0 .. M_{T-1}`` and their seeds into ``buffer``; return
    ``M_T`` and, per segment, the min and max of the memory it wrote (NaN and infinities
    propagate into them, and unlike a sum they cannot overflow), read after the replay."""
    probes: list[Tensor] = []
    with torch.no_grad():
        m = net.init_memory(_batch_size(rollout)) if memory_in is None else memory_in.detach()
        for t in range(len(rollout)):
            buffer.push(m, seeds[t])
            _, written = step(rollout, t, m, _seed(seeds[t]), with_loss=False)
            assert written is not None
            m = written
            probes.extend(torch.aminmax(m))
    return m, probes


@dataclass
class _Losses:
    """The replay's losses: ``values`` in reverse segment order, ``steps`` their segments."""

    values: list[Tensor]
    steps: list[int]


def _replay(
    net: Memformer,
    step: _Step,
    rollout: Rollout,
    buffer: ReplayBuffer,
    memory_in: Tensor | None,
    params: list[nn.Parameter],
) -> tuple[_Losses, Tensor | None, list[Tensor | None]]:
    """Step 2: replay the segments backwards, one ``autograd.grad`` call each; return the losses,
    ``G_0`` (None when ``M_0`` needs none) and the parameters' gradients summed over the segments
    (None for a parameter no segment reached). Nothing is written into any ``.grad``."""
    num_segments, batch_size = len(rollout), _batch_size(rollout)
    losses = _Losses([], [])
    acc: list[Tensor | None] = [None] * len(params)
    grad_memory: Tensor | None = None
    one: Tensor | None = None  # d loss / d loss, made once per rollout
    for t in reversed(range(num_segments)):
        if t > 0:
            buffer.prefetch(t - 1)
        if rollout.targets[t] is None and grad_memory is None:
            continue  # nothing downstream depends on this segment (the last encoder step)
        with torch.enable_grad():
            m_t = _replay_input(net, buffer, t, memory_in, batch_size)
            loss, m_next = step(
                rollout, t, m_t, _seed(buffer.rng_seed(t)), with_memory=grad_memory is not None
            )
        outputs, seeds = [], []
        if loss is not None:
            losses.values.append(loss.detach())
            losses.steps.append(t)
            one = torch.ones_like(loss) if one is None else one
            outputs.append(loss)
            seeds.append(one)
        if grad_memory is not None:
            assert m_next is not None
            outputs.append(m_next)
            seeds.append(grad_memory)
        leaf = m_t.is_leaf and m_t.requires_grad
        inputs = [*params, m_t] if leaf else params
        got = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
        grad_memory = got[-1] if leaf else None
        _accumulate(acc, params, got[: len(params)])
    return losses, grad_memory, acc


def _accumulate(
    acc: list[Tensor | None], params: list[nn.Parameter], got: tuple[Tensor | None, ...]
) -> None:
    """``acc[i] += got[i]`` with one ``_foreach_add_`` (in the order ``AccumulateGrad`` would
    add, so the sums are bit-identical); a first gradient is copied in the parameter's layout
    (the one autograd returned may be an expanded view, or shared with another input)."""
    pairs = [(a, g) for a, g in zip(acc, got) if a is not None and g is not None]
    if pairs:
        torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
    for i, g in enumerate(got):
        if acc[i] is None and g is not None:
            p = params[i]
            acc[i] = g.clone() if g.stride() == p.stride() else torch.empty_like(p).copy_(g)


def _check_finite(
    rollout: Rollout,
    memory_probes: list[Tensor],
    loss_steps: list[int],
    losses: Tensor,
    ddp: DistributedDataParallel | None,
    device: torch.device,
) -> None:
    """Raise FloatingPointError naming the first segment whose memory (first) or loss is not
    finite, with one host read for both; under DDP every rank raises when any rank would."""
    num_segments = len(rollout)
    flags = torch.isfinite(torch.cat([torch.stack(memory_probes), losses]))
    finite = flags.tolist()
    memory_ok = [finite[2 * t] and finite[2 * t + 1] for t in range(num_segments)]
    bad_memory = memory_ok.index(False) if False in memory_ok else num_segments
    bad_memory = _agree(ddp, bad_memory, num_segments, device)
    if bad_memory < num_segments:
        raise FloatingPointError(
            f"mrbp.backward: the memory written by segment {bad_memory} is not finite"
            f"{_ON_A_RANK if ddp else ''}; no gradient was changed"
        )
    loss_ok = finite[2 * num_segments :]
    bad = [t for t, ok in zip(loss_steps, loss_ok) if not ok]
    bad_loss = _agree(ddp, min(bad, default=num_segments), num_segments, device)
    if bad_loss < num_segments:
        raise FloatingPointError(
            f"mrbp.backward: the loss of segment {bad_loss} is not finite"
            f"{_ON_A_RANK if ddp else ''}; no gradient was changed"
        )


def _batch_size(rollout: Rollout) -> int:
    """The batch size of a rollout."""
    return rollout.input_ids[0].shape[0]


def _seed(stored: int) -> int | None:
    return None if stored == NO_SEED else stored


def _replay_input(
    net: Memformer, buffer: ReplayBuffer, t: int, memory_in: Tensor | None, batch_size: int
) -> Tensor:
    """``M_t`` for the replay of segment ``t``: a leaf that collects ``G_t``. ``M_0`` is rebuilt
    from the memory bias when the caller gave no memory (its gradient flows into the bias), and
    needs no gradient when the caller's memory does not require one. A caller's memory that does
    receives ``G_0`` only after every check passed (see :func:`backward`)."""
    if t == 0 and memory_in is None:
        return net.init_memory(batch_size)
    if t == 0 and memory_in is not None and not memory_in.requires_grad:
        return buffer.get(0)
    return buffer.get(t).requires_grad_()


_ON_A_RANK = " on at least one DDP rank"


def _agree(
    ddp: DistributedDataParallel | None, first_bad: int, none: int, device: torch.device
) -> int:
    """The smallest ``first_bad`` over the DDP ranks (``none`` = nothing bad).

    Every rank must raise together: a rank that raised alone would leave the others waiting in
    the gradient all-reduce.
    """
    if ddp is None:
        return first_bad
    flag = torch.tensor([min(first_bad, none)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=ddp.process_group)
    return int(flag.item())


@contextlib.contextmanager
def _forward_redirected(module: nn.Module, forward: Callable[[], Tensor]) -> Iterator[None]:
    """Make ``module(...)`` run ``forward`` for the body (an instance attribute shadows the
    class's method), so a wrapper such as DDP that calls ``module`` runs our function instead."""
    saved = module.__dict__.get("forward")
    module.__dict__["forward"] = forward
    try:
        yield
    finally:
        if saved is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = saved


def _synchronize(ddp: DistributedDataParallel, net: Memformer, params: list[nn.Parameter]) -> None:
    """Average every parameter's accumulated ``.grad`` over the ranks with DDP's own reducer.

    The replay's backward calls ran on the wrapped module, which DDP's reducer ignores (no
    forward went through the wrapper), so gradients accumulated locally as under ``no_sync``.
    Here one forward goes through the wrapper, redirected to ``0 * sum(p.sum())`` over every
    parameter, and its backward adds zero to every ``.grad``: each parameter's gradient hook
    fires once, so the reducer all-reduces the whole accumulated gradient in its buckets (comm
    hooks, ``gradient_as_bucket_view`` and ``find_unused_parameters`` all keep working) and
    every rank ends with the mean over ranks, as DDP computes it. Syncing on a replayed segment
    instead would miss the parameters that segment does not touch.
    """

    def touch_every_parameter() -> Tensor:
        return sum((p.sum() for p in params), torch.zeros((), device=net.device)) * 0.0

    with torch.enable_grad(), _forward_redirected(net, touch_every_parameter):
        out = ddp()
    out.backward()


def _merge(params: list[nn.Parameter], grads: list[Tensor | None]) -> None:
    """Add the rollout's gradients into ``.grad``: one ``_foreach_add_`` into the existing
    tensors (in place: a DDP bucket view stays a bucket view), the new ones assigned."""
    pairs = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None and g is not None]
    if pairs:
        torch._foreach_add_([old for old, _ in pairs], [g for _, g in pairs])
    for p, g in zip(params, grads):
        if p.grad is None and g is not None:
            p.grad = g
