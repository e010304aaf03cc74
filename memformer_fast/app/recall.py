"""The long-range recall task behind ``memformer-fast demo``, and its evaluation.

A sequence is ``T`` segments of ``L`` tokens. A key (one of ``num_keys`` tokens) sits at a random
position of the first segment, every other token is a random distractor, and the sequence ends
with a query token whose answer is the key. Only the answer is scored. Seen from the last segment
alone the key is unknowable, so a model whose memory is reset at every segment can only guess
(``1 / num_keys``); a model that remembers recalls it. A model learns it along a
:func:`curriculum` of growing rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import IGNORE_INDEX, Memformer
from ..rollout import shift_right

QUERY_TOKEN = 1  # token 0 is the model's BOS and never appears in a sequence
MARKER_TOKEN = 2
FIRST_KEY = 3


@dataclass(frozen=True)
class RecallTask:
    """Token layout of the recall task: ``[BOS, QUERY, MARKER, keys..., other content...]``.

    The key is one of ``num_keys`` tokens and follows a marker at a random place of the first
    segment; every other position holds a random content token, keys included, so the key is known
    only by the marker before it (a model must bind the two before it writes the key into memory).
    """

    segment_length: int = 16
    num_keys: int = 8
    num_distractors: int = 15

    def __post_init__(self) -> None:
        if self.segment_length < 2:
            raise ValueError(f"segment_length must be >= 2, got {self.segment_length}")
        if self.num_keys < 2 or self.num_distractors < 1:
            raise ValueError("the recall task needs num_keys >= 2 and num_distractors >= 1")

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.num_keys + self.num_distractors

    @property
    def chance(self) -> float:
        """The accuracy of a guess: what a model without memory can reach."""
        return 1.0 / self.num_keys

    def sample(
        self,
        batch_size: int,
        num_segments: int,
        *,
        key_copies: int = 1,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids [B, T*L], labels [B, T*L], keys [B])`` on the CPU.

        ``key_copies`` marker-key pairs sit in the first segment (more copies make an easier task;
        one is the task itself). ``labels`` are -100 except the last position, whose label is the
        key: the query (second to last token) predicts it.
        """
        L = self.segment_length
        if num_segments < 2:
            raise ValueError(f"num_segments must be >= 2, got {num_segments}")
        if not 1 <= key_copies <= L // 2:
            raise ValueError(f"key_copies must be in [1, {L // 2}], got {key_copies}")
        ids = torch.randint(
            FIRST_KEY, self.vocab_size, (batch_size, num_segments * L), generator=generator
        )
        last_key = FIRST_KEY + self.num_keys
        keys = torch.randint(FIRST_KEY, last_key, (batch_size,), generator=generator)
        if key_copies == 1:
            markers = torch.randint(0, L - 1, (batch_size, 1), generator=generator)
        else:  # distinct pairs (2i, 2i + 1)
            pairs = torch.rand(batch_size, L // 2, generator=generator).argsort(dim=1)
            markers = 2 * pairs[:, :key_copies]
        ids[:, :L].scatter_(1, markers, MARKER_TOKEN)
        ids[:, :L].scatter_(1, markers + 1, keys[:, None].expand_as(markers))
        ids[:, -2] = QUERY_TOKEN
        ids[:, -1] = keys
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -1] = keys
        return ids, labels, keys


def answers(model: Memformer, context: Tensor, query: Tensor, memory: Tensor | None) -> Tensor:
    """``[B]``: the model's greedy answer to the query segment ``query [B, L]`` (on the CPU).

    The decoder reads the query with ``memory``; its logits at the query token (second to last)
    predict the key. The encoder-decoder decodes the query from the encoding of ``context [B, L]``
    (the segment before it) read with ``memory``; its logits at the last position (whose decoder
    input is the query token) predict the key.
    """
    if model.config.architecture == "encoder-decoder":
        decoder_input_ids, _ = shift_right(query, None, model.config.bos_token_id)
        logits = model(context, memory=memory, decoder_input_ids=decoder_input_ids).logits
        assert logits is not None
        return logits[:, -1].argmax(-1).cpu()
    logits = model(query, memory=memory).logits
    assert logits is not None
    return logits[:, -2].argmax(-1).cpu()


@torch.no_grad()
def recall_accuracy(
    model: Memformer,
    input_ids: Tensor,
    keys: Tensor,
    *,
    reset_memory: bool = False,
    batch_size: int = 256,
) -> float:
    """Fraction of sequences whose query the model answers with the key (greedy).

    The decoder reads the last segment with the memory of the ones before; the encoder-decoder
    decodes the last segment from the encoding of the one before it (which read the memory of the
    earlier ones). ``reset_memory=True`` gives that last step the initial memory: it then sees no
    trace of the first segment (for rollouts of three segments or more), so only its own forward
    pass is needed.
    """
    was_training = model.training
    model.eval()
    L = model.config.segment_length
    context_segments = 2 if model.config.architecture == "encoder-decoder" else 1
    correct = 0
    try:
        for ids, key in zip(input_ids.split(batch_size), keys.split(batch_size)):
            ids = ids.to(model.device)
            segments = ids.split(L, dim=1)
            memory = None
            if not reset_memory:
                memory = model.init_memory(len(ids))
                for segment in segments[:-context_segments]:
                    _, memory = model.read_segment(segment, memory)
            correct += int((answers(model, segments[-2], segments[-1], memory) == key).sum())
    finally:
        model.train(was_training)
    return correct / len(input_ids)


@torch.no_grad()
def recall_by_length(
    model: Memformer,
    task: RecallTask,
    lengths: Sequence[int],
    num_sequences: int = 256,
    *,
    generator: torch.Generator | None = None,
    first_segments: Tensor | None = None,
    keys: Tensor | None = None,
    on_segment: Callable[[int, Tensor, Tensor, bool], None] | None = None,
    copies: int = 1,
) -> dict[int, float]:
    """Recall after each of ``lengths`` segments, from one stream at constant memory.

    The sequences share their first segment (the key's) and their distractors up to each length;
    the query segment is decoded from a copy of the memory when a length is reached, the stream
    goes on without it. So one pass of ``max(lengths)`` segments answers every length, and the
    memory held is one state whatever the length. ``first_segments [N, L]`` and ``keys [N]``
    replace the sampled ones; ``on_segment(t, memory, next_memory, queried)`` sees each segment
    written (``queried``: a query was decoded from ``memory`` just before). ``copies > 1``: the
    rows are that many blocks that share every segment after the first (twins whose first segments
    differ only in the key show what the memory holds of it).
    """
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be >= 2 segments, got {list(lengths)}")
    if first_segments is None or keys is None:
        ids, _, keys = task.sample(num_sequences, 2, generator=generator)
        first_segments = ids[:, : task.segment_length]
    was_training = model.training
    model.eval()
    rows, L = len(keys), task.segment_length
    if rows % copies:
        raise ValueError(f"{rows} sequences do not split into {copies} copies")

    def draw() -> Tensor:
        block = torch.randint(FIRST_KEY, task.vocab_size, (rows // copies, L), generator=generator)
        return block.repeat(copies, 1)

    # The segments decoded from the memory: the query's (decoder), or the one before it too.
    lag = 2 if model.config.architecture == "encoder-decoder" else 1
    accuracy: dict[int, float] = {}
    memory = model.init_memory(rows)
    segment = first_segments.to(model.device)
    try:
        for t in range(max(lengths)):
            queried = t + lag in lengths
            if queried:
                query = draw()
                query[:, -2], query[:, -1] = QUERY_TOKEN, keys
                answered = answers(model, segment, query.to(model.device), memory)
                accuracy[t + lag] = float((answered == keys).float().mean())
            _, next_memory = model.read_segment(segment, memory)
            if on_segment is not None:
                on_segment(t, memory, next_memory, queried)
            memory = next_memory
            segment = draw().to(model.device)
    finally:
        model.train(was_training)
    return dict(sorted(accuracy.items()))


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: ``steps`` updates on rollouts of ``shortest`` to ``num_segments``
    segments, drawn uniformly at every update (``shortest`` defaults to ``num_segments``)."""

    num_segments: int
    key_copies: int
    steps: int
    shortest: int | None = None

    def draw(self, generator: torch.Generator | None = None) -> int:
        """The number of segments of the next rollout."""
        low = self.shortest or self.num_segments
        return int(torch.randint(low, self.num_segments + 1, (1,), generator=generator))

    @property
    def label(self) -> str:
        low = self.shortest or self.num_segments
        return f"T={low}" if low == self.num_segments else f"T={low}-{self.num_segments}"


def curriculum(num_segments: int, steps_per_stage: int, key_copies: int = 1) -> list[Stage]:
    """Rollouts of 2 segments, then of 2 up to a bound doubled at each stage until
    ``num_segments``, a single key throughout.

    Each update draws its length from the stage's range: trained on even lengths only (2, 4,
    8, ...) the memory can learn to alternate from one segment to the next and recall only after
    an even number of segments (docs/memory_learning.md). ``steps_per_stage`` updates per stage,
    twice as many on the last. ``key_copies > 1`` adds a first stage of two segments with that
    many marker-key pairs (an easier start; the defaults learn without it).
    """
    n = steps_per_stage
    stages = [Stage(2, key_copies, n)] if key_copies > 1 else []
    t = 2
    while t < num_segments:
        stages.append(Stage(t, 1, n, shortest=2))
        t *= 2
    stages.append(Stage(num_segments, 1, 2 * n, shortest=2))
    return stages
