"""The long-range recall task behind ``memformer-fast demo``, and its evaluation.

A sequence is ``T`` segments of ``L`` tokens. A key (one of ``num_keys`` tokens) sits at a random
position of the first segment, every other token is a random distractor, and the sequence ends
with a query token whose answer is the key. Only the answer is scored. Seen from the last segment
alone the key is unknowable, so a model whose memory is reset at every segment can only guess
(``1 / num_keys``); a model that remembers recalls it. A model learns it along a
:func:`curriculum` of growing rollouts.

:class:`AssociativeRecallTask` asks more of the memory: many key-value pairs written at the start,
several of their keys queried segments later (multi-query associative recall, MQAR, as Zoology
compares sequence models with, here across segments).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class AssociativeRecallTask:
    """Multi-query associative recall across segments: ``[BOS, QUERY, MARKER, keys, values,
    distractors]``.

    The first segments hold ``num_pairs`` key-value pairs, ``k1 v1 k2 v2 ...`` from their first
    position on (distinct keys, values drawn with repetition), the rest of those segments and every
    segment up to the last hold distractors, and the last segment ends with ``num_queries`` of the
    keys, each followed by its value: the key predicts the value, and only the values are scored.
    Keys, values and distractors are disjoint token ranges, so a pair is known by its tokens alone.
    """

    segment_length: int = 16
    num_pairs: int = 3
    num_queries: int = 1
    num_keys: int = 8
    num_values: int = 8
    num_distractors: int = 15

    def __post_init__(self) -> None:
        L = self.segment_length
        if L < 2:
            raise ValueError(f"segment_length must be >= 2, got {L}")
        if not 1 <= self.num_pairs <= self.num_keys:
            raise ValueError(
                f"num_pairs must be in [1, num_keys={self.num_keys}] (keys are distinct), "
                f"got {self.num_pairs}"
            )
        if not 1 <= self.num_queries <= min(self.num_pairs, L // 2):
            raise ValueError(
                f"num_queries must be in [1, {min(self.num_pairs, L // 2)}] (at most num_pairs, "
                f"and they fit in one segment of {L}), got {self.num_queries}"
            )
        if self.num_values < 2 or self.num_distractors < 1:
            raise ValueError("associative recall needs num_values >= 2 and num_distractors >= 1")

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.num_keys

    @property
    def first_distractor(self) -> int:
        return self.first_value + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.first_distractor + self.num_distractors

    @property
    def chance(self) -> float:
        """The accuracy of a guess: what a model without memory can reach."""
        return 1.0 / self.num_values

    @property
    def pair_segments(self) -> int:
        """The number of segments the pairs take (two tokens a pair)."""
        return -(-2 * self.num_pairs // self.segment_length)

    def sample(
        self, batch_size: int, num_segments: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids [B, T*L], labels [B, T*L], values [B, Q])`` on the CPU: ``labels`` hold
        the queried values at their positions in the last segment, -100 elsewhere."""
        L, P, Q = self.segment_length, self.num_pairs, self.num_queries
        if num_segments < self.pair_segments + 1:
            raise ValueError(
                f"num_segments must be >= {self.pair_segments + 1} (the pairs take "
                f"{self.pair_segments}, the queries one more), got {num_segments}"
            )
        ids = torch.randint(self.first_distractor, self.vocab_size, (batch_size, num_segments * L),
                            generator=generator)  # fmt: skip
        keys = FIRST_KEY + torch.rand(batch_size, self.num_keys, generator=generator).argsort(1)
        keys = keys[:, :P]
        values = torch.randint(self.first_value, self.first_distractor, (batch_size, P),
                               generator=generator)  # fmt: skip
        ids[:, 0 : 2 * P : 2], ids[:, 1 : 2 * P : 2] = keys, values
        asked = torch.rand(batch_size, P, generator=generator).argsort(1)[:, :Q]
        start = num_segments * L - 2 * Q
        ids[:, start::2] = keys.gather(1, asked)
        ids[:, start + 1 :: 2] = values.gather(1, asked)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, start + 1 :: 2] = ids[:, start + 1 :: 2]
        return ids, labels, values.gather(1, asked)


def predictions(model: Memformer, context: Tensor, query: Tensor, memory: Tensor | None) -> Tensor:
    """``[B, L]``: the model's greedy prediction of each token of the query segment
    ``query [B, L]`` (on the CPU).

    The decoder reads the query with ``memory``: its logits at position ``p - 1`` predict token
    ``p`` (position 0, which no token of the segment predicts, is -1). The encoder-decoder decodes
    the query from the encoding of ``context [B, L]`` (the segment before it) read with
    ``memory``: its logits at ``p`` (whose decoder input is token ``p - 1``) predict token ``p``.
    """
    if model.config.architecture == "encoder-decoder":
        decoder_input_ids, _ = shift_right(query, None, model.config.bos_token_id)
        logits = model(context, memory=memory, decoder_input_ids=decoder_input_ids).logits
        assert logits is not None
        return logits.argmax(-1).cpu()
    logits = model(query, memory=memory).logits
    assert logits is not None
    unpredicted = torch.full((len(query), 1), -1, dtype=torch.long)
    return torch.cat([unpredicted, logits[:, :-1].argmax(-1).cpu()], dim=1)


@torch.no_grad()
def query_accuracy(
    model: Memformer,
    input_ids: Tensor,
    labels: Tensor,
    *,
    reset_memory: bool = False,
    batch_size: int = 256,
) -> float:
    """Fraction of the labelled tokens of the last segment that the model predicts (greedy).

    ``input_ids``, ``labels``: ``[N, T*L]``, labels -100 where nothing is asked. The decoder reads
    the last segment with the memory of the ones before; the encoder-decoder decodes the last
    segment from the encoding of the one before it (which read the memory of the earlier ones).
    ``reset_memory=True`` gives that last step the initial memory: it then sees no trace of the
    first segment (for rollouts of three segments or more), so only its own forward pass is
    needed.
    """
    was_training = model.training
    model.eval()
    L = model.config.segment_length
    context_segments = 2 if model.config.architecture == "encoder-decoder" else 1
    correct = asked = 0
    try:
        for ids, target in zip(input_ids.split(batch_size), labels[:, -L:].split(batch_size)):
            ids = ids.to(model.device)
            segments = ids.split(L, dim=1)
            memory = None
            if not reset_memory:
                memory = model.init_memory(len(ids))
                for segment in segments[:-context_segments]:
                    _, memory = model.read_segment(segment, memory)
            scored = target != IGNORE_INDEX
            predicted = predictions(model, segments[-2], segments[-1], memory)
            correct += int((predicted == target)[scored].sum())
            asked += int(scored.sum())
    finally:
        model.train(was_training)
    return correct / asked


def recall_accuracy(model: Memformer, input_ids: Tensor, keys: Tensor, **kwargs: Any) -> float:
    """Fraction of the sequences ``input_ids [N, T*L]`` of :class:`RecallTask` whose query the
    model answers with its key (``keys [N]``); the options of :func:`query_accuracy`."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = keys
    return query_accuracy(model, input_ids, labels, **kwargs)


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
                answered = predictions(model, segment, query.to(model.device), memory)[:, -1]
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
