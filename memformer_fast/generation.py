"""Streaming generation in constant memory: :class:`SegmentStream`, `stream`, `generate`.

The prompt is cut into segments from its start, as a rollout is cut; complete segments are
written into the memory and dropped. The segment being generated lives in key/value caches (at
most ``segment_length`` positions), so each new token costs one position's work.
:class:`SegmentStream` is that state machine, the only one: the :class:`~memformer_fast.Memformer`
methods ``stream`` and ``generate`` run it, and the Hugging Face cache
(:class:`memformer_fast.hf.MemformerCache`) is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .layers import KVCache
from .validation import HostReads, check_ids, check_memory, check_resets

if TYPE_CHECKING:  # type hints only: the model imports this module
    from .model import Memformer


def new_caches(model: Memformer, pairs: bool = False) -> list:
    """Empty key/value caches: one per memory-reading block, or a (self, cross) pair per
    decoder block."""
    if pairs:
        return [(KVCache(), KVCache()) for _ in model.decoder]
    return [KVCache() for _ in model.blocks]


def _check_sampling(max_new_tokens: object, temperature: float, top_k: object) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Greedy (``temperature == 0``) or temperature / top-k sampling from ``logits [B, V]``."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class SegmentStream:
    """The streaming state of a model: the memory and what the segment being written holds.

    One state machine for :func:`stream` and the Hugging Face cache
    (:class:`memformer_fast.hf.MemformerCache` subclasses it). Segments are cut from the start of
    the stream, as a rollout is cut; a complete segment is written into the memory and its caches
    are dropped, so the state is bounded whatever the length of the text: one position's work per
    token, constant memory.

    Attributes (all batch-first; ``B`` rows):

    - ``memory``: ``[B, S, D]`` in ``memory_dtype``, the memory before the current segment (None
      until :meth:`start`);
    - ``seen``: tokens consumed so far; ``length``: tokens of the current (incomplete) segment,
      ``0 <= length < segment_length``;
    - ``block_caches``: one :class:`KVCache` per memory-reading block (decoder architecture);
    - ``hidden``: the current segment's final hidden states, one ``[B, n, D]`` per call (decoder);
    - ``segment_ids``, ``masks``: the current segment's tokens ``[B, n]`` and attention masks
      (None = no padding), one per call;
    - ``context``, ``context_mask``: the encoder output ``[B, L, D]`` of the last complete segment
      and its mask (encoder-decoder), None before the first segment is complete;
    - ``decoder_caches``: a (self, cross) :class:`KVCache` pair per decoder block, holding BOS and
      the current segment's tokens (encoder-decoder);
    - ``padded``: the last call had an attention mask: its key/value caches saw padding, so the
      stream cannot be continued.
    """

    def __init__(self) -> None:
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
        self.padded = False

    def start(self, model: Memformer, memory: Tensor) -> None:
        """Begin the stream from ``memory [B, S, D]`` (already checked)."""
        self.memory = memory
        self.block_caches = new_caches(model)

    def feed(
        self, model: Memformer, input_ids: Tensor, mask: Tensor | None = None, keep: int = 0
    ) -> Tensor:
        """Feed ``input_ids [B, n]`` (ids already checked) through ``model``, updating the state.

        Returns the logits ``[B, n, V]`` (the last ``keep`` positions when ``keep > 0``) in the
        causal LM convention: position ``i`` scores the token that follows ``input_ids[:, i]``.
        A position the model cannot predict from (the first segment of the encoder-decoder,
        except its last token) gets NaN logits. ``mask [B, n]`` (bool, None = no padding) is
        accepted only where a segment starts, and marks the stream as padded.

        The encoder-decoder, whose decoder needs a previous segment, writes a stream's first
        segment early when a call ends before it is complete (a short prompt is read whole).
        """
        if self.memory is None:
            raise RuntimeError("SegmentStream.feed before start: the stream has no memory")
        if self.padded:
            raise ValueError(
                "this MemformerCache was built from a padded input (attention_mask with zeros): "
                "its key/value caches include padding, so it cannot be continued; generation "
                "needs unpadded prompts"
            )
        if input_ids.shape[0] != self.memory.shape[0]:
            raise ValueError(
                f"input_ids must have the cache's batch size {self.memory.shape[0]}, "
                f"got {input_ids.shape[0]}"
            )
        feed = self._feed_encoder_decoder if model.is_encoder_decoder else self._feed_decoder
        logits = feed(model, input_ids, mask, keep if keep > 0 else input_ids.shape[1])
        self.seen += input_ids.shape[1]
        self.padded = mask is not None
        return logits

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every batch-first tensor of the state (beam search reorders rows)."""

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

    def _pieces(
        self, model: Memformer, input_ids: Tensor, mask: Tensor | None
    ) -> list[tuple[int, Tensor, Tensor | None]]:
        """Cut ``input_ids`` at the segment boundaries: ``(start, ids, mask)`` per piece."""
        if mask is not None and self.length != 0:
            raise ValueError(
                "attention_mask with padding is supported only where a segment starts (a fresh "
                "cache): the cached attention of a continued segment has no key mask"
            )
        L = model.config.segment_length
        pieces, start, room = [], 0, L - self.length
        while start < input_ids.shape[1]:
            end = min(start + room, input_ids.shape[1])
            piece_mask = None if mask is None else mask[:, start:end]
            pieces.append((start, input_ids[:, start:end], piece_mask))
            start, room = end, L
        return pieces

    def _segment_mask(self) -> Tensor | None:
        """One ``[B, L]`` mask for a segment fed in several calls (None when unpadded)."""
        if all(m is None for m in self.masks):
            return None
        return torch.cat(
            [
                torch.ones_like(ids, dtype=torch.bool) if m is None else m
                for m, ids in zip(self.masks, self.segment_ids)
            ],
            dim=1,
        )

    def _feed_decoder(
        self, model: Memformer, input_ids: Tensor, mask: Tensor | None, keep: int
    ) -> Tensor:
        L, n = model.config.segment_length, input_ids.shape[1]
        kept: list[Tensor] = []
        for start, ids, piece_mask in self._pieces(model, input_ids, mask):
            assert self.memory is not None
            h = model._run_blocks(ids, self.memory, piece_mask, caches=self.block_caches)
            self.hidden.append(h)
            self.masks.append(piece_mask)
            self.segment_ids.append(ids)
            self.length += ids.shape[1]
            first_kept = max(n - keep - start, 0)
            if first_kept < ids.shape[1]:
                kept.append(h[:, first_kept:])
            if self.length == L:  # segment complete: write it and start the next one
                hidden = torch.cat(self.hidden, 1)
                self.memory = model.writer(
                    self.memory, hidden, self._segment_mask(), validate=False
                )
                self.block_caches, self.hidden, self.masks = new_caches(model), [], []
                self.segment_ids, self.length = [], 0
        return model.decode(None, model.norm(torch.cat(kept, dim=1)))

    def _feed_encoder_decoder(
        self, model: Memformer, input_ids: Tensor, mask: Tensor | None, keep: int
    ) -> Tensor:
        L, n = model.config.segment_length, input_ids.shape[1]
        outputs: list[tuple[int, Tensor]] = []  # (first position, logits [B, k, V])
        for start, ids, piece_mask in self._pieces(model, input_ids, mask):
            completes = self.length + ids.shape[1] == L
            # The token that completes a segment is predicted from the next segment's BOS.
            decoded = ids[:, :-1] if completes else ids
            # The decoder runs where logits are kept, and on a segment left incomplete (to fill
            # its caches); a prompt's complete segments are only encoded.
            wanted = start + decoded.shape[1] > n - keep or not completes
            if self.context is not None and decoded.shape[1] > 0 and wanted:
                out = model.decode(
                    decoded, self.context, self.context_mask, caches=self.decoder_caches
                )
                outputs.append((start, out))
            self.segment_ids.append(ids)
            self.masks.append(piece_mask)
            self.length += ids.shape[1]
            if completes:
                outputs.append((start + ids.shape[1] - 1, self._write_segment(model)))
        if self.context is None and self.length > 0:  # a stream's short first segment
            outputs.append((n - 1, self._write_segment(model)))
        out = outputs[-1][1]  # the last position is always predicted
        logits = out.new_full((out.shape[0], keep, out.shape[-1]), float("nan"))
        for start, out in outputs:
            lo, hi = max(start, n - keep), start + out.shape[1]
            if lo < hi:
                logits[:, lo - (n - keep) : hi - (n - keep)] = out[:, lo - start :]
        return logits

    def _write_segment(self, model: Memformer) -> Tensor:
        """Encode the current segment, write it into the memory, and start decoding the next one
        from BOS: returns BOS's logits ``[B, 1, V]`` (the prediction of the next segment's first
        token)."""
        assert self.memory is not None
        segment = torch.cat(self.segment_ids, dim=1)
        segment_mask = self._segment_mask()
        self.context, self.memory = model.read_segment(segment, self.memory, segment_mask)
        self.context_mask = segment_mask
        self.decoder_caches = new_caches(model, pairs=True)
        self.segment_ids, self.masks, self.length = [], [], 0
        bos = segment.new_full((segment.shape[0], 1), model.config.bos_token_id)
        return model.decode(bos, self.context, segment_mask, caches=self.decoder_caches)


@torch.no_grad()
def stream(
    model: Memformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    memory: Tensor | None = None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    reset: Tensor | None = None,
) -> Iterator[Tensor]:
    """Yield ``max_new_tokens`` tokens ``[B]`` one at a time, in constant memory
    (``Memformer.stream``).

    The prompt ``[B, P]`` is cut into segments from its start, exactly as ``sequence_loss`` cuts
    a rollout; completed segments are written into the memory and dropped, so memory use does not
    grow with the output. ``temperature=0`` is greedy decoding; otherwise sampling (optionally
    from the ``top_k`` most likely tokens). ``reset [B]`` (bool): the rows where it is True start
    from the initial memory instead of ``memory`` (their prompt begins a new document). No
    gradient is recorded.
    """
    _check_sampling(max_new_tokens, temperature, top_k)
    reads = HostReads(model.device)  # the id range and the memory's finiteness: one read
    prompt_ids = check_ids(model, "prompt_ids", prompt_ids, reads=reads)
    reset = check_resets(model, "reset", reset, [prompt_ids.shape[0]], "[B]")
    given = memory is not None
    memory = check_memory(model, memory, prompt_ids.shape[0], reads=reads)
    reads.read()
    if reset is not None and given:
        memory = model.reset_memory(memory, reset)
    state = SegmentStream()
    state.start(model, memory)
    logits = state.feed(model, prompt_ids, keep=1)
    for i in range(max_new_tokens):
        token = _sample(logits[:, -1].float(), temperature, top_k, generator)
        yield token
        if i + 1 < max_new_tokens:  # the last token's logits would be unused
            logits = state.feed(model, token[:, None], keep=1)


def generate(
    model: Memformer,
    prompt_ids: Tensor,
    max_new_tokens: int,
    memory: Tensor | None = None,
    *,
    reset: Tensor | None = None,
    **sampling: Any,
) -> Tensor:
    """The ``max_new_tokens`` tokens ``[B, max_new_tokens]`` that follow ``prompt_ids``
    (``Memformer.generate``; :func:`stream` describes the sampling options, ``reset [B]`` and the
    segmentation)."""
    tokens = list(stream(model, prompt_ids, max_new_tokens, memory, reset=reset, **sampling))
    if not tokens:
        return prompt_ids.new_empty(prompt_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(tokens, dim=1)
