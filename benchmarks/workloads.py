"""Models, rollouts and training steps shared by the benchmarks and :mod:`memory_probe`.

A :class:`RolloutCase` names a model size, a training method and a rollout length; :func:`build`
turns it into a model and a closure that runs one training step over one rollout (forward and
backward, gradients accumulated into ``.grad``). The same description rebuilds the same case in a
fresh process, where the CPU memory probe measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memformer_fast import Memformer, MemformerConfig, mrbp, randomness
from memformer_fast.model import IGNORE_INDEX
from memformer_fast.presets import preset

# Model sizes (memformer_fast.presets has what each is).
SIZES: dict[str, dict[str, object]] = {
    name: preset(name) for name in ("paper", "paper-decoder12", "cpu-small", "cpu-decoder4")
}

# Training methods over a rollout:
#   bptt        model.sequence_loss(ids).backward(): every segment's activations stay alive;
#   checkpoint  the same loss, each segment wrapped in torch.utils.checkpoint (only M_t is kept,
#               the segment is recomputed during the backward);
#   mrbp        memformer_fast.mrbp.backward (every later segment predicted, the full objective);
#   mrbp-offload  the same with the replay buffer in pinned host memory (CUDA);
#   mrbp-last   mrbp.backward with only the last segment scored: the peer's task;
#   peer-mrbp   lucidrains' memformer 0.3.1 and its memory_replay_backprop (last segment scored).
METHODS = ("bptt", "checkpoint", "mrbp", "mrbp-offload", "mrbp-last", "peer-mrbp")


@dataclass(frozen=True)
class RolloutCase:
    """One training step over a rollout of ``segments`` segments of ``batch_size`` sequences."""

    size: str
    method: str
    segments: int
    batch_size: int
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {list(SIZES)}, got {self.size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def segment_length(self) -> int:
        return int(SIZES[self.size]["segment_length"])  # type: ignore[call-overload]

    @property
    def tokens(self) -> int:
        """Tokens read by the model in one rollout."""
        return self.batch_size * self.segments * self.segment_length

    def spec(self) -> dict[str, object]:
        """A JSON-able description that :func:`build` turns back into the same case."""
        return asdict(self)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_model(size: str, backend: str, device: torch.device) -> Memformer:
    """A ``memformer_fast`` model of a named size (seeded, so every process builds the same)."""
    torch.manual_seed(0)
    return Memformer(MemformerConfig(**SIZES[size], backend=backend)).to(device)  # type: ignore[arg-type]


def build(case: RolloutCase, device: torch.device) -> tuple[nn.Module, Callable[[], None]]:
    """The model of ``case`` and a closure running one training step over one rollout."""
    if case.method == "peer-mrbp":
        return _build_peer(case, device)
    model = make_model(case.size, case.backend, device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(
        model.config.vocab_size,
        (case.batch_size, case.segments * case.segment_length),
        generator=generator,
    ).to(device)
    if case.method == "bptt":
        return model, lambda: model.sequence_loss(ids)[0].backward()
    if case.method == "checkpoint":
        return model, lambda: checkpointed_backward(model, ids)
    if case.method == "mrbp":
        return model, lambda: _discard(mrbp.backward(model, ids))
    if case.method == "mrbp-offload":
        return model, lambda: _discard(mrbp.backward(model, ids, offload=True))
    labels = ids.clone()
    labels[:, : -case.segment_length] = IGNORE_INDEX
    return model, lambda: _discard(mrbp.backward(model, ids, labels=labels))


def _discard(_: object) -> None:
    """Drop a step's result: the benchmarks only keep its gradients."""


def checkpointed_backward(model: Memformer, ids: Tensor) -> None:
    """The BPTT loss with segment-level ``torch.utils.checkpoint``, then one backward.

    Only each segment's input memory is saved; the segment (critical path, decoder and loss) is
    recomputed when the backward reaches it, with the dropout seeds of ``sequence_loss``.
    """
    rollout = model.plan_rollout(ids)
    memory = model.init_memory(ids.shape[0])
    total: Tensor | None = None
    for t in range(len(rollout)):
        seed = None if rollout.seed is None else randomness.segment_seed(rollout.seed, t)

        def segment(m: Tensor, t: int = t, seed: int | None = seed) -> tuple[Tensor, Tensor]:
            loss, new_memory = model.rollout_step(rollout, t, m, seed)
            return (m.new_zeros(()) if loss is None else loss), new_memory

        loss, memory = checkpoint(segment, memory, use_reentrant=False)
        total = loss if total is None else total + loss
    assert total is not None
    total.backward()


def make_peer(size: str, device: torch.device) -> nn.Module:
    """lucidrains' ``memformer.Memformer`` (PyPI 0.3.1) at the configuration of ``size``.

    Matched: width, heads, feed-forward width (its FeedForward fixes 4 * dim), encoder and decoder
    depth, memory slots, segment length and vocabulary. Not matched (they are the peer's design):
    see the README's "Peer" section.
    """
    from memformer import Memformer as PeerMemformer

    s = SIZES[size]
    if s["architecture"] != "encoder-decoder" or s["d_ff"] != 4 * s["d_model"]:  # type: ignore[operator]
        raise ValueError(
            f"the peer only matches encoder-decoder sizes with d_ff = 4 d_model: {size}"
        )
    torch.manual_seed(0)
    return PeerMemformer(
        dim=s["d_model"],
        num_memory_slots=s["n_memory_slots"],
        mem_update_attn_heads=s["n_heads"],
        enc_num_tokens=s["vocab_size"],
        enc_max_seq_len=s["segment_length"],
        enc_depth=s["n_encoder_layers"],
        enc_heads=s["n_heads"],
        dec_num_tokens=s["vocab_size"],
        dec_max_seq_len=s["segment_length"],
        dec_depth=s["n_decoder_layers"],
        dec_heads=s["n_heads"],
    ).to(device)


def _build_peer(case: RolloutCase, device: torch.device) -> tuple[nn.Module, Callable[[], None]]:
    """The peer's MRBP: ``T`` segments through its encoder, its decoder on the last one only."""
    from memformer import memory_replay_backprop

    model = make_peer(case.size, device)
    vocab = int(SIZES[case.size]["vocab_size"])  # type: ignore[call-overload]
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(
        vocab, (case.batch_size, case.segments * case.segment_length), generator=generator
    ).to(device)
    # The decoder reads tgt[:, :-1] and predicts tgt[:, 1:]: one segment of targets.
    tgt = torch.randint(vocab, (case.batch_size, case.segment_length + 1), generator=generator)
    tgt = tgt.to(device)
    return model, lambda: memory_replay_backprop(model, src, tgt)


def train_step(
    size: str, backend: str, dtype: torch.dtype, batch_size: int, device: torch.device
) -> tuple[Memformer, Callable[[], None]]:
    """One segment's training step: read ``s_t`` and write the memory, decode ``s_{t+1}``, backward.

    The input memory requires grad (as inside a BPTT rollout), so the backward runs through the
    writer and the memory readers too. ``dtype`` bfloat16 runs under autocast; the memory stays in
    float32.
    """
    model = make_model(size, backend, device)
    length, vocab = model.config.segment_length, model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (batch_size, 2 * length), generator=generator).to(device)
    segment, labels = ids[:, :length], ids[:, length:]
    memory = torch.randn(
        batch_size, model.config.n_memory_slots, model.config.d_model, device=device
    )
    memory = nn.functional.normalize(memory, dim=-1).requires_grad_()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(segment, memory=memory, labels=labels)
        assert out.loss is not None
        torch.autograd.backward([out.loss, out.memory], [None, torch.ones_like(out.memory)])

    return model, step
