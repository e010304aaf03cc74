"""Memory Replay Back-Propagation (the paper's Algorithm 1; docs/design.md).

MRBP trains through a whole rollout while keeping the activations of one segment alive:

1. a no-grad pass along the critical path (for a :class:`Memformer`, blocks and memory writer;
   the decoder, LM head and loss are skipped) pushes ``M_0 .. M_{T-1}`` into a replay buffer,
   and records what recreates each segment's randomness;
2. walking back from the last segment, each segment is replayed with grad from its stored memory
   and ONE ``torch.autograd.grad([loss_t, M_{t+1}], params + [M_t], [1, G_{t+1}])`` call gives
   the parameters' gradients (summed over the segments with ``torch._foreach_add_``, added into
   ``.grad`` only once every check passed) and ``G_t``.

One core (:func:`_compute`, then :func:`_commit`) runs both public entry points; a plan says how
to run one segment:

- :func:`backward` for a :class:`Memformer`: each segment's dropout masks come from seeds derived
  from one seed per rollout (:mod:`memformer_fast.randomness`), so the gradients equal those of
  ``model.sequence_loss(...).backward()`` up to float rounding, dropout included;
- :func:`backward_segments` for any model whose segment step is ``step(segment, memory) ->
  (loss, new_memory)``: the global generators' states are saved before each segment and restored
  for its replay, as ``torch.utils.checkpoint`` does, so the gradients equal those of the plain
  loop ``sum(losses).backward()`` (BPTT) with dropout drawn from torch's generators.

Under ``DistributedDataParallel`` (:func:`backward`) the replay runs on the wrapped module, outside
DDP's reducer, and the gradients are averaged over the ranks ONCE per rollout, after the last
backward call, by one pass through the DDP wrapper (:func:`synchronize_gradients`, which a
training loop that accumulates several rollouts calls itself).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

from . import compiled, randomness
from .model import Memformer
from .replay import ReplayBuffer
from .rollout import Rollout
from .validation import check_memory


@dataclass
class MRBPResult:
    """``loss``: the rollout's loss (detached; for :func:`backward` the mean cross-entropy as
    ``sequence_loss`` defines it, for :func:`backward_segments` the sum of the steps' losses);
    ``memory``: ``M_T`` (detached), to carry into the next rollout; ``num_segments``: ``T``."""

    loss: Tensor
    memory: Tensor
    num_segments: int


def _unwrap(model: nn.Module) -> Memformer:
    inner = getattr(model, "module", model)  # DistributedDataParallel and similar wrappers
    if not isinstance(inner, Memformer):
        raise TypeError(
            f"model must be a Memformer (or wrap one), got {type(inner).__name__}; for a model "
            "of your own, use mrbp.backward_segments(step, segments, memory)"
        )
    if _sharded(model):
        raise TypeError(
            "mrbp.backward does not support FSDP (sharded parameters): it drives the model's "
            "parts outside forward(), where FSDP keeps them sharded. Use DistributedDataParallel, "
            "or BPTT (sequence_loss) with FSDP; see docs/robustness.md"
        )
    return inner


def _refuse_gradient_hooks(named: Iterable[tuple[str, Tensor]], caller: str) -> None:
    """Refuse parameters with gradient hooks: ``register_post_accumulate_grad_hook`` hooks and
    plain ``register_hook`` hooks. ``named`` pairs each tensor with how the error names it
    (``"parameter 'writer.bias'"``).

    MRBP accumulates each gradient over one backward call per segment, into tensors of its own
    merged into ``.grad`` at the end to stay atomic: a post-accumulate hook (the
    optimizer-in-backward pattern) would fire once per segment on a partial gradient, and before
    the finiteness checks; a plain hook would see each segment's partial gradient, so a
    non-linear one (a clamp) gives another gradient than under BPTT, where it sees the whole
    gradient once.
    """
    for what, p in named:
        if getattr(p, "_post_accumulate_grad_hooks", None):
            raise RuntimeError(
                f"{caller}: {what} has a post-accumulate-grad hook "
                "(register_post_accumulate_grad_hook); MRBP runs one backward call per segment, "
                "so it would fire once per segment on a partial gradient. Remove the hooks and "
                "act on .grad after the call returns, or train with BPTT"
            )
        if getattr(p, "_backward_hooks", None):
            raise RuntimeError(
                f"{caller}: {what} has a gradient hook (register_hook); MRBP "
                "runs one backward call per segment, so it would see each segment's partial "
                "gradient (once per segment, not once per rollout as under BPTT). Remove the "
                "hooks and act on .grad after the call returns, or train with BPTT"
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


class _Plan(Protocol):
    """How the core runs one segment of a rollout of ``num_segments``."""

    num_segments: int

    def critical(self, t: int, memory: Tensor) -> Tensor:
        """Segment ``t`` without grad: ``M_{t+1}``; records what recreates its randomness."""
        ...

    def replay(
        self, t: int, memory: Tensor, with_memory: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Segment ``t`` again, with grad and the randomness of :meth:`critical`: ``(loss or
        None, M_{t+1} or None)``; ``with_memory=False`` allows skipping the memory's write."""
        ...

    def has_loss(self, t: int) -> bool:
        """Whether segment ``t`` scores anything (a segment that does not, and whose memory
        gets no gradient, is not replayed)."""
        ...


def _check_flags(**flags: object) -> None:
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")


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
            the call runs inside ``model.no_sync()``. For a model of your own, see
            :func:`backward_segments`.
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
            :func:`_refuse_gradient_hooks`); nothing was changed.
        FloatingPointError: a segment's memory or loss is not finite; every ``.grad`` (the
            parameters' and ``memory``'s) is then left exactly as it was before the call. Under
            DDP every rank raises when any rank finds a non-finite value.
    """
    net = _unwrap(model)
    named = ((f"parameter {name!r}", p) for name, p in net.named_parameters())
    _refuse_gradient_hooks(named, "mrbp.backward")
    ddp = model if isinstance(model, DistributedDataParallel) else None
    _check_flags(offload=offload, preserve_rng=preserve_rng)
    mode = compiled.check_mode(compile, net)
    params: list[Tensor] = [p for p in net.parameters() if p.requires_grad]
    with _generator_restored_on_error():  # a refused call has drawn no rollout seed
        rollout = net.plan_rollout(input_ids, attention_mask, labels, resets=resets)
        batch_size = rollout.input_ids[0].shape[0]
        # A memory that is not finite is refused by the atomic check (FloatingPointError). With
        # none given, M_0 is built from the memory bias with grad: the core hands G_0 to it.
        if memory is None:
            memory_in = net.init_memory(batch_size)
        else:
            memory_in = check_memory(net, memory, batch_size, finite=False)
        plan = _MemformerPlan(net, rollout, mode, preserve_rng)
        outcome = _compute(plan, memory_in, params, offload, ddp, "mrbp.backward")
    result = _commit(outcome)
    if ddp is not None and ddp.require_backward_grad_sync:
        synchronize_gradients(ddp, outcome.gradients.params)
    return result


class _MemformerPlan:
    """A :class:`Memformer` rollout's segments: the critical path skips the decoder and the loss,
    and each segment's dropout masks come from ``randomness.segment_seed(rollout seed, t)``, the
    seeds ``sequence_loss`` uses (so nothing per segment needs storing)."""

    def __init__(self, net: Memformer, rollout: Rollout, mode: str | None, preserve_rng: bool):
        self.net, self.rollout, self.num_segments = net, rollout, len(rollout)
        self.preserve_rng = preserve_rng
        if mode is None:
            # net.rollout_step looked up now: a wrapper of that method sees every call. It runs
            # the writer whether or not its output gets a gradient (autograd then reaches none of
            # the writer's parameters anyway). The compiled step skips the writer then: a graph
            # returns a zero gradient, not None, for a parameter it does not reach, so the
            # writer's parameters would get zeros where eager MRBP and BPTT leave None (and
            # AdamW would decay them).
            self._step: Callable[..., tuple[Tensor | None, Tensor | None]] = net.rollout_step
            self._compiled = False
        else:
            self._step = functools.partial(compiled.rollout_step, net, mode)
            self._compiled = True

    def _seed(self, t: int) -> int | None:
        if self.rollout.seed is None or not self.preserve_rng:
            return None
        return randomness.segment_seed(self.rollout.seed, t)

    def critical(self, t: int, memory: Tensor) -> Tensor:
        _, written = self._step(self.rollout, t, memory, self._seed(t), with_loss=False)
        assert written is not None
        return written

    def replay(
        self, t: int, memory: Tensor, with_memory: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        if self._compiled:
            return self._step(self.rollout, t, memory, self._seed(t), with_memory=with_memory)
        return self._step(self.rollout, t, memory, self._seed(t))

    def has_loss(self, t: int) -> bool:
        return self.rollout.targets[t] is not None


def backward_segments(
    step: Callable[[Any, Tensor], tuple[Tensor, Tensor]],
    segments: Sequence[Any],
    memory: Tensor,
    *,
    parameters: Iterable[Tensor] | None = None,
    offload: bool = False,
    preserve_rng: bool = True,
) -> MRBPResult:
    """MRBP for any model with a recurrent memory: accumulate into ``.grad`` the gradient of
    ``sum_t loss_t`` over the rollout ``loss_t, M_{t+1} = step(segments[t], M_t)``, keeping the
    activations of one segment alive.

    The gradients equal those of plain back-propagation through time (the same loop under grad,
    then ``sum(losses).backward()``) up to float rounding, with dropout: the global generators'
    states (CPU, and CUDA on the devices of the memory and of the segment's tensors) are saved
    before each segment and restored for its replay, as ``torch.utils.checkpoint`` does, and
    left after the call where that loop leaves them.

    Args:
        step: ``step(segment, memory) -> (loss, new_memory)``, a function of your modules (or a
            module): ``loss`` a 0-dim floating tensor (scale it by ``1 / T`` for a mean),
            ``new_memory`` a tensor of ``memory``'s shape, dtype and device. It runs twice per
            segment: once without grad (its loss unused), once with grad; it must compute the
            same function both times (no state of its own that changes between the calls).
        segments: a sequence (list, tuple, or a tensor indexed on its first dimension) of ``T
            >= 1`` per-segment inputs, each whatever ``step`` takes (tensors, tuples or dicts).
        memory: ``M_0``, a floating tensor of any shape (``[B, S, D]`` for a
            :class:`~memformer_fast.MemoryWriter`'s ``initial_memory(B)``). If it requires grad,
            its gradient flows back into it (and whatever graph produced it, such as the
            writer's bias) after every check passed.
        parameters: the only tensors whose ``.grad`` receives the gradient (like the ``inputs``
            of ``torch.autograd.backward``); default every leaf that requires grad and that the
            steps (or ``memory``'s graph) reach, as ``loss.backward()`` would.
        offload: keep the replay buffer in pinned host memory (CUDA).
        preserve_rng: restore each segment's generator states in the replay (exact gradients
            with dropout); False replays with fresh draws.

    Returns:
        :class:`MRBPResult` (``loss``: the sum of the segments' losses).

    Raises:
        TypeError, ValueError: a bad argument, or a step that returns something other than a
            0-dim floating loss and a memory like ``memory``; nothing was changed.
        RuntimeError: a parameter has a gradient hook (MRBP would call it once per segment).
        FloatingPointError: a segment's memory or loss is not finite (named); every ``.grad``
            is left exactly as it was before the call.
    """
    caller = "mrbp.backward_segments"
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if isinstance(segments, (str, bytes)) or not isinstance(segments, (Sequence, Tensor)):
        raise TypeError(
            f"segments must be a sequence of per-segment inputs (a list, a tuple or a tensor "
            f"[T, ...]), got {type(segments).__name__}"
        )
    if len(segments) == 0:
        raise ValueError("segments must hold at least one segment, got an empty sequence")
    if not isinstance(memory, Tensor) or not memory.is_floating_point():
        what = f"dtype {memory.dtype}" if isinstance(memory, Tensor) else type(memory).__name__
        raise TypeError(f"memory must be a floating-point tensor, got {what}")
    _check_flags(offload=offload, preserve_rng=preserve_rng)
    params = None if parameters is None else _checked_parameters(parameters, caller)
    with _generator_restored_on_error():
        plan = _StepPlan(step, segments, memory, preserve_rng)
        outcome = _compute(plan, memory, params, offload, None, caller)
    outcome.memory_inputs = params
    return _commit(outcome)


def _checked_parameters(parameters: Iterable[Tensor], caller: str) -> list[Tensor]:
    """``parameters`` as a list of distinct tensors that require grad, without gradient hooks."""
    params = list(parameters)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            got = f"requires_grad={p.requires_grad}" if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(
                f"parameters must hold tensors that require grad; parameters[{i}] is {got}"
            )
    if not params:
        raise ValueError("parameters must hold at least one tensor, got none")
    _refuse_gradient_hooks(((f"parameters[{i}]", p) for i, p in enumerate(params)), caller)
    return list({id(p): p for p in params}.values())  # a tensor listed twice counts once


_RngState = tuple[Tensor, list[tuple[torch.device, Tensor]]]


class _StepPlan:
    """A user's ``step(segment, memory) -> (loss, new_memory)`` over ``segments``: every segment
    runs whole on both passes (the step cannot be split), and the randomness is recreated by
    saving the global generators' states before each segment of the critical path (the CPU
    generator's is about 5 KB) and restoring them around its replay."""

    def __init__(
        self,
        step: Callable[[Any, Tensor], Any],
        segments: Sequence[Any],
        memory: Tensor,
        preserve_rng: bool,
    ) -> None:
        self.step, self.segments, self.num_segments = step, segments, len(segments)
        self.like = memory
        self.states: list[_RngState] | None = [] if preserve_rng else None

    def _run(self, t: int, memory: Tensor) -> tuple[Tensor, Tensor]:
        """``step(segments[t], memory)``, its result checked."""
        result = self.step(self.segments[t], memory)
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError(
                f"step must return (loss, new_memory), got {type(result).__name__} for segment {t}"
            )
        loss, new = result
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            raise ValueError(
                f"step must return a 0-dim floating-point loss, got {_describe(loss)} for "
                f"segment {t}"
            )
        like = self.like
        if not isinstance(new, Tensor) or _layout(new) != _layout(like):
            raise ValueError(
                f"step must return a new memory like the memory ({_describe(like)}), got "
                f"{_describe(new)} for segment {t}"
            )
        return loss, new

    def _devices(self, t: int, memory: Tensor) -> list[torch.device]:
        """The CUDA devices whose generators segment ``t`` may draw from (as checkpoint infers
        them: those of its tensors)."""
        tensors = [x for x in tree_leaves(self.segments[t]) if isinstance(x, Tensor)]
        return sorted({x.device for x in [memory, *tensors] if x.device.type == "cuda"}, key=str)

    def critical(self, t: int, memory: Tensor) -> Tensor:
        if self.states is not None:
            devices = self._devices(t, memory)
            cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]
            self.states.append((torch.get_rng_state(), cuda))
        return self._run(t, memory)[1]

    def replay(self, t: int, memory: Tensor, with_memory: bool) -> tuple[Tensor, Tensor]:
        if self.states is None:
            return self._run(t, memory)
        with _rng_state_for_the_body(self.states[t]):
            return self._run(t, memory)

    def has_loss(self, t: int) -> bool:
        return True


def _layout(x: Tensor) -> tuple[torch.Size, torch.dtype, torch.device]:
    return x.shape, x.dtype, x.device


def _describe(x: object) -> str:
    """``x``'s shape, dtype and device if it is a tensor, else its type."""
    if isinstance(x, Tensor):
        return f"shape {list(x.shape)}, {x.dtype} on {x.device}"
    return type(x).__name__


@contextlib.contextmanager
def _rng_state_for_the_body(state: _RngState) -> Iterator[None]:
    """Set the generators to ``state`` for the body, then back to what they were."""
    cpu, cuda = state
    saved = torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d, _ in cuda]
    torch.set_rng_state(cpu)
    for device, s in cuda:
        torch.cuda.set_rng_state(s, device)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        for device, s in saved[1]:
            torch.cuda.set_rng_state(s, device)


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


class _Gradients:
    """The tensors a call trains and their gradients summed over the segments, kept apart from
    ``.grad`` until the call commits. Given ``params=None``, the tensors are discovered in each
    replayed segment's graph: every leaf that ``loss.backward()`` would accumulate into."""

    def __init__(self, params: list[Tensor] | None, caller: str) -> None:
        self.discover, self.caller = params is None, caller
        self.params: list[Tensor] = [] if params is None else params
        self.sums: list[Tensor | None] = [None] * len(self.params)
        self._known = {id(p) for p in self.params}

    def reach(self, outputs: list[Tensor], memory: Tensor) -> None:
        """Add the leaves that ``outputs`` depend on (but ``memory``, the replayed state)."""
        if not self.discover:
            return
        for leaf in _leaves_reached(outputs):
            if leaf is memory or id(leaf) in self._known:
                continue
            what = f"a parameter of shape {list(leaf.shape)}"
            _refuse_gradient_hooks([(what, leaf)], self.caller)
            self._known.add(id(leaf))
            self.params.append(leaf)
            self.sums.append(None)

    def add(self, got: Sequence[Tensor | None]) -> None:
        """``sums[i] += got[i]`` with one ``_foreach_add_`` (in the order ``AccumulateGrad``
        would add, so the sums are bit-identical); a first gradient is copied in the parameter's
        layout (the one autograd returned may be an expanded view, or shared with another
        input)."""
        pairs = [(a, g) for a, g in zip(self.sums, got) if a is not None and g is not None]
        if pairs:
            torch._foreach_add_([a for a, _ in pairs], [g for _, g in pairs])
        for i, g in enumerate(got):
            if self.sums[i] is None and g is not None:
                p = self.params[i]
                self.sums[i] = (
                    g.clone() if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                )


def _leaves_reached(outputs: list[Tensor]) -> list[Tensor]:
    """The leaves requiring grad that a backward from ``outputs`` would accumulate into (the
    ``AccumulateGrad`` nodes of their graph), in a fixed order."""
    found: list[Tensor] = []
    seen: set[Any] = set()
    stack: list[Any] = [o.grad_fn for o in outputs if o.grad_fn is not None]
    found.extend(o for o in outputs if o.grad_fn is None and o.requires_grad)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if isinstance(variable, Tensor):
            found.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


@dataclass
class _Outcome:
    """What :func:`_compute` found, for :func:`_commit` to hand over."""

    loss: Tensor
    memory: Tensor
    num_segments: int
    gradients: _Gradients
    memory_in: Tensor
    grad_memory: Tensor | None
    # What G_0 may reach through the graph that produced memory_in (None: every leaf, as
    # loss.backward() would); backward_segments' explicit parameters restrict it as well.
    memory_inputs: list[Tensor] | None = None


def _compute(
    plan: _Plan,
    memory_in: Tensor,
    params: list[Tensor] | None,
    offload: bool,
    ddp: DistributedDataParallel | None,
    caller: str,
) -> _Outcome:
    """The critical path, the replay and the finiteness checks; nothing is written into any
    ``.grad`` (raises ``FloatingPointError`` naming the first bad segment)."""
    shape, dtype, device = memory_in.shape, memory_in.dtype, memory_in.device
    buffer = ReplayBuffer(plan.num_segments, shape, dtype, device, offload)
    try:
        final_memory, memory_probes = _critical_path(plan, buffer, memory_in)
        gradients = _Gradients(params, caller)
        losses, grad_memory = _replay(plan, buffer, memory_in, gradients)
    finally:
        buffer.clear()
    loss = torch.stack(losses.values)  # segments in reverse order
    _check_finite(plan.num_segments, memory_probes, losses.steps, loss, ddp, caller)
    return _Outcome(loss.sum(), final_memory, plan.num_segments, gradients, memory_in, grad_memory)


def _commit(outcome: _Outcome) -> MRBPResult:
    """Every check passed: the gradients leave the call, into ``.grad`` and into the caller's
    memory (and whatever graph produced it, such as the memory bias of ``M_0``)."""
    _merge(outcome.gradients.params, outcome.gradients.sums)
    if outcome.memory_in.requires_grad and outcome.grad_memory is not None:
        torch.autograd.backward(
            outcome.memory_in, outcome.grad_memory, inputs=outcome.memory_inputs
        )
    return MRBPResult(loss=outcome.loss, memory=outcome.memory, num_segments=outcome.num_segments)


def _critical_path(
    plan: _Plan, buffer: ReplayBuffer, memory_in: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Step 1, without grad: push ``M_0 .. M_{T-1}`` into ``buffer``; return ``M_T`` and, per
    segment, the min and max of the memory it wrote (NaN and infinities propagate into them, and
    unlike a sum they cannot overflow), read after the replay."""
    probes: list[Tensor] = []
    with torch.no_grad():
        m = memory_in.detach()
        for t in range(plan.num_segments):
            buffer.push(m)
            m = plan.critical(t, m)
            probes.extend(torch.aminmax(m))
    return m, probes


@dataclass
class _Losses:
    """The replay's losses: ``values`` in reverse segment order, ``steps`` their segments."""

    values: list[Tensor]
    steps: list[int]


def _replay(
    plan: _Plan, buffer: ReplayBuffer, memory_in: Tensor, gradients: _Gradients
) -> tuple[_Losses, Tensor | None]:
    """Step 2: replay the segments backwards, one ``autograd.grad`` call each, summing the
    parameters' gradients into ``gradients``; return the losses and ``G_0`` (None when ``M_0``
    needs none). Nothing is written into any ``.grad``."""
    losses = _Losses([], [])
    grad_memory: Tensor | None = None
    one: Tensor | None = None  # d loss / d loss, made once per rollout
    for t in reversed(range(plan.num_segments)):
        if t > 0:
            buffer.prefetch(t - 1)
        if not plan.has_loss(t) and grad_memory is None:
            continue  # nothing downstream depends on this segment (the last encoder step)
        with torch.enable_grad():
            m_t = buffer.get(t)
            if t > 0 or memory_in.requires_grad:
                m_t.requires_grad_()  # a leaf that collects G_t
            loss, m_next = plan.replay(t, m_t, with_memory=grad_memory is not None)
        outputs, seeds = [], []
        if loss is not None:
            losses.values.append(loss.detach())
            losses.steps.append(t)
            if loss.requires_grad:
                one = torch.ones_like(loss) if one is None else one
                outputs.append(loss)
                seeds.append(one)
        if grad_memory is not None and m_next is not None and m_next.requires_grad:
            outputs.append(m_next)
            seeds.append(grad_memory)
        gradients.reach(outputs, m_t)
        inputs = [*gradients.params, m_t] if m_t.requires_grad else gradients.params
        if not outputs or not inputs:
            grad_memory = None  # nothing in this segment depends on anything trained
            continue
        got = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
        grad_memory = got[-1] if m_t.requires_grad else None
        gradients.add(got[: len(gradients.params)])
    return losses, grad_memory


def _check_finite(
    num_segments: int,
    memory_probes: list[Tensor],
    loss_steps: list[int],
    losses: Tensor,
    ddp: DistributedDataParallel | None,
    caller: str,
) -> None:
    """Raise FloatingPointError naming the first segment whose memory (first) or loss is not
    finite, with one host read for both; under DDP every rank raises when any rank would."""
    flags = torch.isfinite(torch.cat([torch.stack(memory_probes).to(losses.device), losses]))
    finite = flags.tolist()
    memory_ok = [finite[2 * t] and finite[2 * t + 1] for t in range(num_segments)]
    bad_memory = memory_ok.index(False) if False in memory_ok else num_segments
    bad_memory = _agree(ddp, bad_memory, num_segments, losses.device)
    if bad_memory < num_segments:
        raise FloatingPointError(
            f"{caller}: the memory written by segment {bad_memory} is not finite"
            f"{_ON_A_RANK if ddp else ''}; no gradient was changed"
        )
    loss_ok = finite[2 * num_segments :]
    bad = [t for t, ok in zip(loss_steps, loss_ok) if not ok]
    bad_loss = _agree(ddp, min(bad, default=num_segments), num_segments, losses.device)
    if bad_loss < num_segments:
        raise FloatingPointError(
            f"{caller}: the loss of segment {bad_loss} is not finite"
            f"{_ON_A_RANK if ddp else ''}; no gradient was changed"
        )


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


def synchronize_gradients(
    ddp: DistributedDataParallel, parameters: Sequence[Tensor] | None = None
) -> None:
    """Average the gradients accumulated in ``.grad`` over the ranks, with ``ddp``'s own reducer.

    For gradients accumulated outside DDP's forward: :func:`backward` calls it once per rollout
    (the replay's backward calls run on the wrapped module, which DDP's reducer ignores, so they
    accumulate locally as under ``no_sync``); a loop that accumulates several rollouts with
    ``no_sync`` before an optimizer step calls it after the last (``MRBPTrainer`` does). Every
    rank must call it: it is a collective.

    One forward goes through the wrapper, redirected to ``0 * sum(p.sum())`` over every
    parameter, and its backward adds zero to every ``.grad``: each parameter's gradient hook
    fires once, so the reducer all-reduces the whole accumulated gradient in its buckets (comm
    hooks, ``gradient_as_bucket_view`` and ``find_unused_parameters`` all keep working) and
    every rank ends with the mean over ranks, as DDP computes it. Syncing on a replayed segment
    instead would miss the parameters that segment does not touch.

    Args:
        ddp: the ``DistributedDataParallel`` wrapper.
        parameters: the parameters to touch; default every parameter of the wrapped module that
            requires grad.
    """
    module = ddp.module
    params = (
        [p for p in module.parameters() if p.requires_grad]
        if parameters is None
        else list(parameters)
    )
    device = params[0].device if params else torch.device("cpu")

    def touch_every_parameter() -> Tensor:
        return sum((p.sum() for p in params), torch.zeros((), device=device)) * 0.0

    with torch.enable_grad(), _forward_redirected(module, touch_every_parameter):
        out = ddp()
    out.backward()


def _merge(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Add the rollout's gradients into ``.grad``: one ``_foreach_add_`` into the existing
    tensors (in place: a DDP bucket view stays a bucket view), the new ones assigned."""
    pairs = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None and g is not None]
    if pairs:
        torch._foreach_add_([old for old, _ in pairs], [g for _, g in pairs])
    for p, g in zip(params, grads):
        if p.grad is None and g is not None:
            p.grad = g
