"""``MemformerCache``: the memory and the key/value caches of the segment being written.

A ``transformers`` :class:`~transformers.Cache` that is a
:class:`memformer_fast.generation.SegmentStream`, the state machine ``Memformer.stream`` runs:
the memory ``M_t [B, S, D]`` and, for the segment being written (at most ``segment_length``
positions), its key/value caches and either its final hidden states (decoder) or its tokens and
the previous segment's encoder output (encoder-decoder). This module adds only the ``Cache``
interface and :func:`advance`, which starts the stream on its first call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache

from ..generation import SegmentStream
from ..model import Memformer
from ..validation import check_memory


class MemformerCache(Cache, SegmentStream):
    """The streaming state of a :class:`~memformer_fast.Memformer`, for ``generate()``.

    The attributes are :class:`~memformer_fast.generation.SegmentStream`'s (``memory``, ``seen``,
    ``length``, the key/value caches, ...). The cache is reordered with the beams in beam search
    (:meth:`reorder_cache`).
    """

    is_compileable = False

    def __init__(self) -> None:
        Cache.__init__(self, layers=[])
        SegmentStream.__init__(self)

    def __repr__(self) -> str:
        shape = None if self.memory is None else list(self.memory.shape)
        return f"MemformerCache(memory={shape}, seen={self.seen}, segment_length={self.length})"

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens consumed so far (``transformers`` slices the prompt with it)."""
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: complete segments are written into the memory

    @property
    def is_linear(self) -> list[bool]:
        # The cache grows with the segment being written, as a key/value cache does: tell
        # transformers to slice the prompt by get_seq_length() when continuing from it.
        return [False]

    @property
    def is_croppable(self) -> bool:
        return False  # a written segment cannot be taken back out of the memory

    @property
    def is_initialized(self) -> bool:
        return self.memory is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.memory is None else self.memory.shape[0]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "MemformerCache cannot be cropped: complete segments are already written into the "
            "memory (assisted decoding and other rollbacks are not supported)"
        )

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows ``beam_idx`` (beam search): memory, caches and states alike."""
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


def advance(
    model: Memformer,
    cache: MemformerCache,
    input_ids: Tensor,
    mask: Tensor | None = None,
    memory: Tensor | None = None,
    keep: int = 0,
) -> Tensor:
    """:meth:`SegmentStream.feed <memformer_fast.generation.SegmentStream.feed>` (the logits
    ``[B, n or keep, V]``), starting an empty ``cache`` from ``memory`` (``M_0``; default
    ``init_memory``)."""
    if cache.memory is None:
        cache.start(model, check_memory(model, memory, input_ids.shape[0]))
    return cache.feed(model, input_ids, mask, keep)
