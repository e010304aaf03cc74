"""The Memformer model: its modules, validated one-segment forward, and the public methods of
rollouts (:mod:`memformer_fast.rollout`) and streaming generation
(:mod:`memformer_fast.generation`), which those modules implement."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import generation, randomness
from . import rollout as _rollout
from .config import MemformerConfig
from .layers import (
    DecoderBlock,
    KVCache,
    MemoryBlock,
    MemoryWriter,
    attention_mask_2d,
    init_weights,
)
from .rollout import Rollout, shift_right, upcast
from .validation import (
    IGNORE_INDEX,
    HostReads,
    check_ids,
    check_labels,
    check_mask,
    check_memory,
    check_resets,
)

__all__ = ["IGNORE_INDEX", "Memformer", "MemformerOutput", "Rollout"]


@dataclass
class MemformerOutput:
    """One segment's result: ``logits [B, L, V]`` (None when nothing was decoded), the next memory
    ``[B, S, D]``, and the mean cross-entropy ``loss`` when labels were given."""

    logits: Tensor | None
    memory: Tensor
    loss: Tensor | None = None


class Memformer(nn.Module):
    """Memory-augmented Transformer that reads a long sequence segment by segment.

    ``architecture="encoder-decoder"``: ``enc_t = Encoder(s_t, M_t)``, ``M_{t+1} = Writer(M_t,
    enc_t)`` and a decoder cross-attending to ``enc_t`` predicts segment ``s_{t+1}``.
    ``architecture="decoder"``: causal blocks with memory readers and an LM head.
    """

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__()
        if not isinstance(config, MemformerConfig):
            raise TypeError(f"config must be a MemformerConfig, got {type(config).__name__}")
        self.config = c = config
        self.is_encoder_decoder = c.architecture == "encoder-decoder"
        n_blocks = c.n_encoder_layers if self.is_encoder_decoder else c.n_decoder_layers
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.dropout = randomness.Dropout(c.dropout)
        # The blocks on the critical path: they read the memory and feed the writer.
        self.blocks = nn.ModuleList(
            MemoryBlock(
                c.d_model,
                c.n_heads,
                c.d_ff,
                c.dropout,
                c.backend,
                causal=not self.is_encoder_decoder,
                eps=c.layer_norm_eps,
                rope_base=c.rope_base,
            )
            for _ in range(n_blocks)
        )
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.decoder = nn.ModuleList(
            DecoderBlock(c.d_model, c.n_heads, c.d_ff, c.dropout, c.layer_norm_eps, c.rope_base)
            for _ in range(c.n_decoder_layers if self.is_encoder_decoder else 0)
        )
        self.decoder_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps) if self.decoder else None
        self.writer = MemoryWriter(
            c.d_model,
            c.n_heads,
            c.n_memory_slots,
            c.write_temperature,
            c.memory_gate,
            c.backend,
            c.layer_norm_eps,
            c.bias_init_norm,
            c.gate_bias_init,
            c.memory_noise,
            c.write_rotary,
            c.rope_base,
        )
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_weights(self, c.init_std, c.embedding_init_std)
        self.writer.reset_memory_parameters()
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    # ------------------------------------------------------------------ memory and validation

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``, but every shape (and with ``strict`` every key) is checked
        first: a checkpoint of another configuration raises before any parameter changes (torch
        alone copies the tensors that fit, then raises)."""
        own = self.state_dict()
        problems = [
            f"{key}: expected shape {list(own[key].shape)}, got {list(value.shape)}"
            for key, value in state_dict.items()
            if key in own and isinstance(value, Tensor) and value.shape != own[key].shape
        ]
        if strict:
            missing = sorted(own.keys() - state_dict.keys())
            unexpected = sorted(state_dict.keys() - own.keys())
            if missing:
                problems.append(f"missing keys: {missing}")
            if unexpected:
                problems.append(f"unexpected keys: {unexpected}")
        if problems:
            raise RuntimeError(
                "state_dict does not fit this Memformer (was it saved with another "
                "MemformerConfig?); nothing was loaded:\n  " + "\n  ".join(problems)
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_memory(self, batch_size: int) -> Tensor:
        """``M_0 = bias / ||bias||`` per slot: ``[batch_size, S, D]`` in ``memory_dtype``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return self.writer.initial_memory(batch_size, self.config.memory_dtype)

    def reset_memory(self, memory: Tensor, reset: Tensor) -> Tensor:
        """``memory [B, S, D]`` with the rows where ``reset [B]`` is True replaced by the initial
        memory ``M_0``: differentiable in both (the memory bias gets the gradient of the reset
        rows, ``memory`` that of the others), no host synchronisation."""
        return torch.where(reset[:, None, None], self.init_memory(memory.shape[0]), memory)

    # ------------------------------------------------------------------ the two halves of a step

    def read_segment(
        self, input_ids: Tensor, memory: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The critical path of one segment: blocks, then the memory writer.

        input_ids: ``[B, L]``, memory: ``[B, S, D]``, mask: ``[B, L]`` bool or None ->
        ``(context [B, L, D], next memory [B, S, D])``. ``context`` is what the decoder
        cross-attends to (encoder-decoder) or what the LM head reads (decoder).
        """
        h = self._run_blocks(input_ids, memory, mask)
        return self.norm(h), self.writer(memory, h, mask, validate=False)

    def _run_blocks(
        self,
        input_ids: Tensor,
        memory: Tensor,
        mask: Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        """The memory-reading blocks: final hidden states ``[B, L, D]`` before the last norm.

        With ``caches`` (one per block; decoder-only generation), ``input_ids`` continue the
        cached positions of the current segment.
        """
        h = self.dropout(self.embed(input_ids))
        attn_mask = attention_mask_2d(
            mask, input_ids.shape[1], not self.is_encoder_decoder, h.device
        )
        for i, block in enumerate(self.blocks):
            h = block(h, memory, attn_mask, None if caches is None else caches[i], validate=False)
        return h

    def decode(
        self,
        decoder_input_ids: Tensor | None,
        context: Tensor,
        context_mask: Tensor | None = None,
        decoder_mask: Tensor | None = None,
        caches: list[tuple[KVCache, KVCache]] | None = None,
    ) -> Tensor:
        """Logits ``[B, Ld, V]`` of the next tokens given the step's ``context [B, L, D]``.

        The decoder-only model reads ``context`` alone (``decoder_input_ids`` may be None).
        With ``caches`` (a self- and a cross-attention cache per decoder block; generation),
        ``decoder_input_ids`` continue the cached positions.
        """
        if not self.is_encoder_decoder:
            return self.lm_head(context)
        assert decoder_input_ids is not None, "the encoder-decoder model needs decoder_input_ids"
        h = self.dropout(self.embed(decoder_input_ids))
        mask = attention_mask_2d(decoder_mask, decoder_input_ids.shape[1], True, h.device)
        for i, block in enumerate(self.decoder):
            cache = None if caches is None else caches[i]
            h = block(h, context, mask, context_mask, cache, validate=False)
        assert self.decoder_norm is not None
        return self.lm_head(self.decoder_norm(h))

    # ------------------------------------------------------------------ one segment

    def forward(
        self,
        input_ids: Tensor,
        memory: Tensor | None = None,
        attention_mask: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        reset: Tensor | None = None,
    ) -> MemformerOutput:
        """One segment ``input_ids [B, L]`` (``L <= segment_length``) with memory ``M_t``.

        Decoder architecture: ``logits [B, L, V]`` predict the next token; ``labels [B, L]`` are
        scored shifted inside (``logits[:, i]`` against ``labels[:, i + 1]``).
        Encoder-decoder: the decoder reads ``decoder_input_ids [B, Ld]`` (default: ``labels``
        shifted right behind BOS) and ``logits[:, i]`` are scored against ``labels[:, i]``, the
        next segment's tokens; with neither, only the memory is computed (``logits`` is None).
        ``memory`` in the output is ``M_{t+1}``.

        ``reset [B]`` (bool, keyword-only): the rows where it is True start this segment from the
        initial memory ``init_memory`` instead of ``memory``, e.g. because a new document starts
        in that row of a packed batch; the other rows read ``memory`` as usual.
        """
        c = self.config
        reads = HostReads(self.device)  # the id range and the memory's finiteness: one read
        input_ids = check_ids(self, "input_ids", input_ids, c.segment_length, reads=reads)
        mask = check_mask("attention_mask", attention_mask, input_ids)
        reset = check_resets(self, "reset", reset, [input_ids.shape[0]], "[B]")
        given = memory is not None
        memory = check_memory(self, memory, input_ids.shape[0], reads=reads)
        reads.read()
        if reset is not None and given:  # without a memory every row starts from M_0 anyway
            memory = self.reset_memory(memory, reset)
        context, new_memory = self.read_segment(input_ids, memory, mask)
        logits = loss = None
        if self.is_encoder_decoder:
            if labels is not None:
                labels = check_labels(self, labels, labels)
                if labels.shape[0] != input_ids.shape[0]:
                    raise ValueError(
                        f"labels must have batch size {input_ids.shape[0]}, got {labels.shape[0]}"
                    )
            if decoder_input_ids is None and labels is not None:
                decoder_input_ids, _ = shift_right(labels, None, c.bos_token_id)
            if decoder_input_ids is not None:
                decoder_input_ids = check_ids(
                    self, "decoder_input_ids", decoder_input_ids, c.segment_length
                )
                if decoder_input_ids.shape[0] != input_ids.shape[0]:
                    raise ValueError(
                        f"decoder_input_ids must have batch size {input_ids.shape[0]}, "
                        f"got {decoder_input_ids.shape[0]}"
                    )
                logits = self.decode(decoder_input_ids, context, mask)
                if labels is not None:
                    if labels.shape != decoder_input_ids.shape:
                        raise ValueError(
                            f"labels must have the shape of decoder_input_ids "
                            f"{list(decoder_input_ids.shape)}, got {list(labels.shape)}"
                        )
                    loss = _segment_loss(logits, labels)
        else:
            if decoder_input_ids is not None:
                raise ValueError(
                    "decoder_input_ids is only used by the 'encoder-decoder' architecture"
                )
            logits = self.decode(input_ids, context)
            if labels is not None:
                labels = check_labels(self, labels, input_ids)
                targets = (
                    labels[:, 1:]
                    if mask is None
                    else labels[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
                )
                loss = _segment_loss(logits[:, :-1], targets)
        return MemformerOutput(logits=logits, memory=new_memory, loss=loss)

    # ------------------------------------------------------------------ rollouts and generation
    # The implementations, documented there; they call none of these methods back.

    plan_rollout = _rollout.plan_rollout
    rollout_logits = _rollout.rollout_logits
    rollout_step = _rollout.rollout_step
    sequence_loss = _rollout.sequence_loss
    stream = generation.stream
    generate = generation.generate


def _segment_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits [B, n, V]`` against ``targets [B, n]`` (-100 ignored).

    A mean over no token is undefined (``F.cross_entropy`` returns NaN): refused, as
    ``sequence_loss`` refuses a rollout with nothing to predict.
    """
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError(
            "labels: the segment has no token to predict (every label is -100 or padded by "
            "attention_mask), so its mean loss is undefined: leave labels out for this segment"
        )
    return F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten())
