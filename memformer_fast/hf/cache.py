"""``MemformerCache``: the memory and the key/value caches of the segment being written.

A ``transformers`` :class:`~transformers.Cache` that holds what ``Memformer.stream`` keeps between
tokens: the memory ``M_t [B, S, D]``, and for the segment being written (at most
``segment_length`` positions) the key/value caches of its blocks and, depending on the
architecture, its final hidden states (decoder: the writer reads them when the segment is
complete) or its tokens and the previous segment's encoder output (encoder-decoder: the decoder
cross-attends to it). A complete segment is written into the memory and its caches are dropped,
so the cache's size is bounded whatever the length of the text: one position's work per token,
constant memory.

:func:`advance` feeds new tokens through the model and updates a cache in place; it reuses the
model's own parts (``_run_blocks``, ``writer``, ``read_segment``, ``decode``, ``KVCache``), in
the order :func:`memformer_fast.generation.stream` calls them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import Cache

from ..generation import new_caches
from ..layers import KVCache
from ..model import Memformer
from ..validation import check_memory


class MemformerCache(Cache):
    """The streaming state of a :class:`~memformer_fast.Memformer`, for ``generate()``.

    Attributes (all batch-first; ``B`` rows):

    - ``memory``: ``[B, S, D]`` in ``memory_dtype``, the memory before the current segment;
    - ``seen``: tokens consumed so far (``get_seq_length()``);
    - ``length``: tokens of the current (incomplete) segment, ``0 <= length < segment_length``;
    - ``block_caches``: one :class:`KVCache` per memory-reading block (decoder architecture);
    - ``hidden``: the current segment's final hidden states, one ``[B, n, D]`` per call;
    - ``segment_ids``: the current segment's tokens, one ``[B, n]`` per call (encoder-decoder);
    - ``masks``: the current segment's attention masks (None = no padding), per call;
    - ``context``, ``context_mask``: the encoder output ``[B, L, D]`` of the last complete segment
      and its mask (encoder-decoder), None before the first segment is complete;
    - ``decoder_caches``: a (self, cross) :class:`KVCache` pair per decoder block, holding BOS
      and the current segment's tokens (encoder-decoder).

    The cache is reordered with the beams in beam search (:meth:`reorder_cache`).
    """

    is_compileable = False

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.memory: Tensor | None = None
        self.seen = 0
        self.length = 0
        self.block_caches: list[KVCache] = []
        self.hidden: list[Tensor] = []
        self.segment_ids: list[Tensor] = []
        self.masks: list[Tensor | None] = []
        self.context: Tensor | None = None
        self.context_mask: Tensor | None = None
        self.decoder_caches: list[tuple[KVCache, KVCache]] = []
        self.padded = False  # built from a padded input: its key/value caches saw padding

    def __repr__(self) -> str:
        shape = None if self.memory is None else list(self.memory.shape)
        return f"MemformerCache(memory={shape}, seen={self.seen}, segment_length={self.length})"

    # ---------------------------------------------------------------- the Cache interface

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
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every batch-first tensor of the state."""

        def opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        def kv(cache: KVCache) -> None:
            cache.k, cache.v = opt(cache.k), opt(cache.v)

        self.memory = opt(self.memory)
        self.hidden = [fn(h) for h in self.hidden]
        self.segment_ids = [fn(i) for i in self.segment_ids]
        self.masks = [opt(m) for m in self.masks]
        self.context, self.context_mask = opt(self.context), opt(self.context_mask)
        for block in self.block_caches:
            kv(block)
        for self_cache, cross_cache in self.decoder_caches:
            kv(self_cache)
            kv(cross_cache)


# --------------------------------------------------------------------------- the stream


def advance(
    model: Memformer,
    cache: MemformerCache,
    input_ids: Tensor,
    mask: Tensor | None = None,
    memory: Tensor | None = None,
    keep: int = 0,
) -> Tensor:
    """Feed ``input_ids [B, n]`` (ids already checked) through ``model``, updating ``cache``.

    Returns the logits ``[B, n, V]`` (the last ``keep`` positions when ``keep > 0``) in the causal
    LM convention: position ``i`` scores the token that follows ``input_ids[:, i]``. A position
    the model cannot predict from (the first segment of the encoder-decoder, except its last
    token) gets NaN logits. ``mask [B, n]`` (bool, None = no padding) is accepted only where a
    segment starts, and marks the cache as padded. ``memory`` is ``M_0`` when the cache is empty.

    Segments are cut from the start of the stream, as ``Memformer.stream`` cuts a prompt; the
    encoder-decoder, whose decoder needs a previous segment, writes a stream's first segment
    early when a call ends before it is complete (as ``stream`` reads a short prompt whole).
    """
    if cache.padded:
        raise ValueError(
            "this MemformerCache was built from a padded input (attention_mask with zeros): its "
            "key/value caches include padding, so it cannot be continued; generation needs "
            "unpadded prompts"
        )
    if cache.memory is None:
        cache.memory = check_memory(model, memory, input_ids.shape[0])
        cache.block_caches = new_caches(model)
    elif input_ids.shape[0] != cache.memory.shape[0]:
        raise ValueError(
            f"input_ids must have the cache's batch size {cache.memory.shape[0]}, "
            f"got {input_ids.shape[0]}"
        )
    step = _advance_encoder_decoder if model.is_encoder_decoder else _advance_decoder
    logits = step(model, cache, input_ids, mask, keep if keep > 0 else input_ids.shape[1])
    cache.seen += input_ids.shape[1]
    cache.padded = mask is not None
    return logits


def _pieces(
    model: Memformer, cache: MemformerCache, input_ids: Tensor, mask: Tensor | None
) -> list[tuple[int, Tensor, Tensor | None]]:
    """Cut ``input_ids`` at the segment boundaries: ``(start, ids, mask)`` per piece."""
    if mask is not None and cache.length != 0:
        raise ValueError(
            "attention_mask with padding is supported only where a segment starts (a fresh "
            "cache): the cached attention of a continued segment has no key mask"
        )
    L = model.config.segment_length
    pieces, start, room = [], 0, L - cache.length
    while start < input_ids.shape[1]:
        end = min(start + room, input_ids.shape[1])
        piece_mask = None if mask is None else mask[:, start:end]
        pieces.append((start, input_ids[:, start:end], piece_mask))
        start, room = end, L
    return pieces


def _segment_mask(masks: list[Tensor | None], pieces: list[Tensor]) -> Tensor | None:
    """One ``[B, L]`` mask for a segment written in several calls (None when unpadded)."""
    if all(m is None for m in masks):
        return None
    return torch.cat(
        [torch.ones_like(p, dtype=torch.bool) if m is None else m for m, p in zip(masks, pieces)],
        dim=1,
    )


def _advance_decoder(
    model: Memformer, cache: MemformerCache, input_ids: Tensor, mask: Tensor | None, keep: int
) -> Tensor:
    L, n = model.config.segment_length, input_ids.shape[1]
    kept: list[Tensor] = []
    for start, ids, piece_mask in _pieces(model, cache, input_ids, mask):
        assert cache.memory is not None
        h = model._run_blocks(ids, cache.memory, piece_mask, caches=cache.block_caches)
        cache.hidden.append(h)
        cache.masks.append(piece_mask)
        cache.segment_ids.append(ids)
        cache.length += ids.shape[1]
        first_kept = max(n - keep - start, 0)
        if first_kept < ids.shape[1]:
            kept.append(h[:, first_kept:])
        if cache.length == L:  # segment complete: write it and start the next one
            segment_mask = _segment_mask(cache.masks, cache.segment_ids)
            cache.memory = model.writer(cache.memory, torch.cat(cache.hidden, 1), segment_mask)
            cache.block_caches, cache.hidden, cache.masks = new_caches(model), [], []
            cache.segment_ids, cache.length = [], 0
    return model.decode(None, model.norm(torch.cat(kept, dim=1)))


def _advance_encoder_decoder(
    model: Memformer, cache: MemformerCache, input_ids: Tensor, mask: Tensor | None, keep: int
) -> Tensor:
    L, n = model.config.segment_length, input_ids.shape[1]
    outputs: list[tuple[int, Tensor]] = []  # (first position, logits [B, k, V])
    for start, ids, piece_mask in _pieces(model, cache, input_ids, mask):
        completes = cache.length + ids.shape[1] == L
        # The token that completes a segment is predicted from the next segment's BOS.
        decoded = ids[:, :-1] if completes else ids
        # The decoder runs where logits are kept, and on a segment left incomplete (to fill its
        # caches); a prompt's complete segments are only encoded, as in Memformer.stream.
        wanted = start + decoded.shape[1] > n - keep or not completes
        if cache.context is not None and decoded.shape[1] > 0 and wanted:
            out = model.decode(
                decoded, cache.context, cache.context_mask, caches=cache.decoder_caches
            )
            outputs.append((start, out))
        cache.segment_ids.append(ids)
        cache.masks.append(piece_mask)
        cache.length += ids.shape[1]
        if completes:
            outputs.append((start + ids.shape[1] - 1, _write_segment(model, cache)))
    if cache.context is None and cache.length > 0:  # a stream's short first segment
        outputs.append((n - 1, _write_segment(model, cache)))
    out = outputs[-1][1]  # the last position is always predicted
    logits = out.new_full((out.shape[0], keep, out.shape[-1]), float("nan"))
    for start, out in outputs:
        lo, hi = max(start, n - keep), start + out.shape[1]
        if lo < hi:
            logits[:, lo - (n - keep) : hi - (n - keep)] = out[:, lo - start :]
    return logits


def _write_segment(model: Memformer, cache: MemformerCache) -> Tensor:
    """Encode the current segment, write it into the memory, and start decoding the next one
    from BOS: returns BOS's logits ``[B, 1, V]`` (the prediction of the next segment's first
    token)."""
    assert cache.memory is not None
    segment = torch.cat(cache.segment_ids, dim=1)
    segment_mask = _segment_mask(cache.masks, cache.segment_ids)
    cache.context, cache.memory = model.read_segment(segment, cache.memory, segment_mask)
    cache.context_mask = segment_mask
    cache.decoder_caches = new_caches(model, pairs=True)
    cache.segment_ids, cache.masks, cache.length = [], [], 0
    bos = segment.new_full((segment.shape[0], 1), model.config.bos_token_id)
    return model.decode(bos, cache.context, segment_mask, caches=cache.decoder_caches)
