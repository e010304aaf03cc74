"""Memory Replay Back-Propagation (SPEC section 4; the paper's Algorithm 1).

MRBP trains through a whole rollout while keeping the activations of one segment alive:

1. a no-grad pass along the critical path (blocks and memory writer; the decoder, LM head and loss
   are skipped) pushes ``M_0 .. M_{T-1}`` and each segment's dropout seed into a replay buffer;
2. walking back from the last segment, each segment is replayed with grad from its stored memory
   and ONE ``torch.autograd.backward([loss_t, M_{t+1}], [1, G_{t+1}])`` call sends the gradient
   into the parameters and to ``M_t``, whose gradient becomes ``G_t``.

Gradients equal those of ``model.sequence_loss(...).backward()`` up to float rounding, dropout
included, because both derive every segment's randomness from the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import randomness
from .model import Memformer
from .replay import ReplayBuffer

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
    return inner


def backward(
    model: nn.Module,
    input_ids: Tensor,
    memory: Tensor | None = None,
    *,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    offload: bool = False,
    preserve_rng: bool = True,
) -> MRBPResult:
    """Accumulate the gradient of the rollout loss into the parameters' ``.grad``.

    Args:
        model: a :class:`Memformer`.
        input_ids: ``[B, T*L]`` token ids (the last segment may be shorter).
        memory: ``M_0 [B, S, D]``, default ``model.init_memory(B)`` (then the memory bias gets
            the gradient through ``M_0`` too, as in BPTT). If it requires grad, its gradient is
            accumulated as well.
        attention_mask: ``[B, T*L]``, 1/True for real tokens.
        labels: ``[B, T*L]``, default ``input_ids``; -100 is ignored.
        offload: keep the replay buffer in pinned host memory (CUDA).
        preserve_rng: recreate each segment's dropout masks in the replay (exact gradients). With
            False, the replay draws fresh masks: cheaper bookkeeping, approximate gradients.

    Returns:
        :class:`MRBPResult`.

    Raises:
        FloatingPointError: a segment's memory or loss is not finite; every ``.grad`` is then
            left exactly as it was before the call.
    """
    net = _unwrap(model)
    rollout = net.plan_rollout(input_ids, attention_mask, labels)
    batch_size, num_segments = rollout.input_ids[0].shape[0], len(rollout)
    memory_in = net._check_memory(memory, batch_size) if memory is not None else None
    seeds = [
        NO_SEED
        if rollout.seed is None or not preserve_rng
        else randomness.segment_seed(rollout.seed, t)
        for t in range(num_segments)
    ]

    # 1. Critical path without grad: store M_0 .. M_{T-1}.
    c = net.config
    buffer = ReplayBuffer(
        num_segments, (batch_size, c.n_memory_slots, c.d_model), c.memory_dtype, net.device, offload
    )
    with torch.no_grad():
        m = net.init_memory(batch_size) if memory_in is None else memory_in.detach()
        finite = []
        for t in range(num_segments):
            buffer.push(m, seeds[t])
            _, m = net.rollout_step(rollout, t, m, _seed(seeds[t]), with_loss=False)
            finite.append(torch.isfinite(m).all())
        final_memory = m
    bad = (~torch.stack(finite)).nonzero()  # one host sync for the whole pass
    if bad.numel():
        raise FloatingPointError(
            f"mrbp.backward: the memory written by segment {int(bad[0])} is not finite; "
            "no gradient was changed"
        )

    # 2. Replay backwards into fresh .grad tensors; merge with the old ones only on success.
    params = [p for p in net.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    losses: list[Tensor] = []
    grad_memory: Tensor | None = None
    try:
        for t in reversed(range(num_segments)):
            if t > 0:
                buffer.prefetch(t - 1)
            if rollout.targets[t] is None and grad_memory is None:
                continue  # nothing downstream depends on this segment (the last encoder step)
            with torch.enable_grad():
                m_t = _replay_input(net, buffer, t, memory_in, batch_size)
                loss, m_next = net.rollout_step(rollout, t, m_t, _seed(buffer.rng_seed(t)))
            outputs, grads = [], []
            if loss is not None:
                losses.append(loss.detach())
                outputs.append(loss)
                grads.append(torch.ones_like(loss))
            if grad_memory is not None:
                outputs.append(m_next)
                grads.append(grad_memory)
            torch.autograd.backward(outputs, grads)
            grad_memory = m_t.grad if m_t.is_leaf else None
        total = torch.stack(losses).sum()
        bad_loss = not bool(torch.isfinite(torch.stack(losses)).all())
    except BaseException:
        _restore(params, saved_grads)
        raise
    if bad_loss:
        _restore(params, saved_grads)
        steps = [t for t in reversed(range(num_segments)) if rollout.targets[t] is not None]
        first = min(t for t, loss in zip(steps, losses) if not torch.isfinite(loss))
        raise FloatingPointError(
            f"mrbp.backward: the loss of segment {first} is not finite; no gradient was changed"
        )
    for p, old in zip(params, saved_grads):
        if old is not None and p.grad is not None:
            p.grad = old.add_(p.grad)
        elif old is not None:
            p.grad = old
    buffer.clear()
    return MRBPResult(loss=total, memory=final_memory, num_segments=num_segments)


def _seed(stored: int) -> int | None:
    return None if stored == NO_SEED else stored


def _replay_input(
    net: Memformer, buffer: ReplayBuffer, t: int, memory_in: Tensor | None, batch_size: int
) -> Tensor:
    """``M_t`` for the replay of segment ``t``: a leaf that collects ``G_t``, except ``M_0``,
    which is rebuilt from the memory bias (or is the caller's tensor) so its gradient flows on."""
    if t == 0 and memory_in is None:
        return net.init_memory(batch_size)
    if t == 0 and memory_in is not None and memory_in.requires_grad:
        return memory_in
    return buffer.get(t).requires_grad_()


def _restore(params: list[nn.Parameter], saved: list[Tensor | None]) -> None:
    for p, old in zip(params, saved):
        p.grad = old
