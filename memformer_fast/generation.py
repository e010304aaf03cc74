"""Streaming generation in constant memory: key/value caches, :func:`stream` and :func:`generate`.

The prompt is cut into segments from its start, as a rollout is cut; complete segments are
written into the memory and dropped. The segment being generated lives in key/value caches (at
most ``segment_length`` positions), so each new token costs one position's work. The
:class:`~memformer_fast.Memformer` methods ``stream`` and ``generate`` call these.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
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


@dataclass
class _Stream:
    """The state of a stream: the memory, the segment being generated and the next logits.

    ``current`` holds the generated segment's tokens (encoder-decoder), ``hidden`` its final
    hidden states for the writer (decoder), ``caches`` the blocks' key/value caches (the decoder
    blocks' pairs for the encoder-decoder), ``length`` its length so far.
    """

    model: Memformer
    memory: Tensor
    bos: Tensor
    context: Tensor | None = None
    current: Tensor | None = None
    caches: list = field(default_factory=list)
    hidden: list[Tensor] = field(default_factory=list)
    length: int = 0
    logits: Tensor | None = None

    def prefill(self, prompt_ids: Tensor) -> None:
        """Read the prompt: write its complete segments, cache the start of the current one."""
        model, L = self.model, self.model.config.segment_length
        chunks = list(prompt_ids.split(L, dim=1))
        # A trailing partial chunk is the start of the segment being generated, except in the
        # encoder-decoder model when it is the whole prompt: then it is a short context segment.
        partial = chunks[-1].shape[1] < L and not (model.is_encoder_decoder and len(chunks) == 1)
        self.current = chunks.pop() if partial else None
        for chunk in chunks:
            self.context, self.memory = model.read_segment(chunk, self.memory)
        self.length = 0 if self.current is None else self.current.shape[1]
        if model.is_encoder_decoder:
            assert self.context is not None
            self.caches = new_caches(model, pairs=True)
            first = self.bos if self.current is None else torch.cat([self.bos, self.current], 1)
            self.logits = model.decode(first, self.context, caches=self.caches)[:, -1]
            return
        self.caches = new_caches(model)
        if self.current is not None:
            self._read_tokens(self.current)
        else:
            assert self.context is not None
            self.logits = model.lm_head(self.context[:, -1])

    def _read_tokens(self, ids: Tensor) -> None:
        """Decoder: run the blocks over ``ids`` continuing the cached positions."""
        model = self.model
        self.hidden.append(model._run_blocks(ids, self.memory, caches=self.caches))
        self.logits = model.lm_head(model.norm(self.hidden[-1][:, -1]))

    def advance(self, token: Tensor) -> None:
        """Append ``token [B]``; write the segment into the memory once it is complete."""
        model, L = self.model, self.model.config.segment_length
        self.length += 1
        if not model.is_encoder_decoder:
            self._read_tokens(token[:, None])
            if self.length == L:  # segment complete: write it and start the next one
                self.memory = model.writer(self.memory, torch.cat(self.hidden, dim=1))
                self.caches, self.hidden, self.length = new_caches(model), [], 0
            return
        step = token[:, None]
        self.current = step if self.current is None else torch.cat([self.current, step], 1)
        if self.length == L:  # segment complete: encode and write it, decode the next one
            self.context, self.memory = model.read_segment(self.current, self.memory)
            self.current, self.length = None, 0
            self.caches = new_caches(model, pairs=True)
            step = self.bos
        assert self.context is not None
        self.logits = model.decode(step, self.context, caches=self.caches)[:, -1]


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
    (:meth:`memformer_fast.Memformer.stream` documents the arguments)."""
    _check_sampling(max_new_tokens, temperature, top_k)
    reads = HostReads(model.device)  # the id range and the memory's finiteness: one read
    prompt_ids = check_ids(model, "prompt_ids", prompt_ids, reads=reads)
    reset = check_resets(model, "reset", reset, [prompt_ids.shape[0]], "[B]")
    given = memory is not None
    memory = check_memory(model, memory, prompt_ids.shape[0], reads=reads)
    reads.read()
    if reset is not None and given:
        memory = model.reset_memory(memory, reset)
    bos = prompt_ids.new_full((prompt_ids.shape[0], 1), model.config.bos_token_id)
    state = _Stream(model, memory, bos)
    state.prefill(prompt_ids)
    for _ in range(max_new_tokens):
        assert state.logits is not None
        token = _sample(state.logits.float(), temperature, top_k, generator)
        yield token
        state.advance(token)


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
    (:meth:`memformer_fast.Memformer.generate`)."""
    tokens = list(model.stream(prompt_ids, max_new_tokens, memory, reset=reset, **sampling))
    if not tokens:
        return prompt_ids.new_empty(prompt_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(tokens, dim=1)
