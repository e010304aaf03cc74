"""The Memformer model (SPEC section 3): both architectures, rollouts and streaming generation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import randomness
from .config import MemformerConfig
from .layers import (
    DecoderBlock,
    KVCache,
    MemoryBlock,
    MemoryWriter,
    attention_mask_2d,
    init_weights,
)

IGNORE_INDEX = -100


@dataclass
class MemformerOutput:
    """One segment's result: ``logits [B, L, V]`` (None when nothing was decoded), the next memory
    ``[B, S, D]``, and the mean cross-entropy ``loss`` when labels were given."""

    logits: Tensor | None
    memory: Tensor
    loss: Tensor | None = None


@dataclass
class Rollout:
    """A rollout ``[B, T*L]`` cut into segments, with what each segment's loss needs.

    ``targets[t]`` are the labels scored on step ``t`` (None when all are ignored: no decoder
    work), ``num_targets`` the count over the whole rollout (each step's loss is a sum divided by
    it, so the per-step losses add up to the rollout's mean), ``seed`` the dropout seed or None.
    ``resets[t]`` is the ``[B]`` bool column of rows whose memory restarts from the initial memory
    before step ``t`` (None when no row resets there: no work at all).
    """

    input_ids: list[Tensor]
    masks: list[Tensor | None]
    targets: list[Tensor | None]
    decoder_inputs: list[Tensor | None]
    decoder_masks: list[Tensor | None]
    num_targets: int
    seed: int | None
    resets: list[Tensor | None] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


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

    def _check_ids(self, name: str, ids: object, max_length: int | None = None) -> Tensor:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"{name} must have shape [B, L] with B, L >= 1, got {list(ids.shape)}")
        if max_length is not None and ids.shape[1] > max_length:
            raise ValueError(
                f"{name} has {ids.shape[1]} tokens, more than segment_length={max_length}; "
                "use sequence_loss or mrbp.backward for a rollout of several segments"
            )
        if ids.device != self.device:
            raise ValueError(
                f"{name} must be on the model's device {self.device}, got {ids.device}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"{name} must hold ids in [0, vocab_size={self.config.vocab_size}), "
                f"got values in [{lo}, {hi}]"
            )
        return ids.long()

    def _check_mask(self, name: str, mask: object, like: Tensor) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be bool or integer (1 = real token), got {mask.dtype}")
        if mask.shape != like.shape:
            raise ValueError(f"{name} must have shape {list(like.shape)}, got {list(mask.shape)}")
        if mask.device != like.device:
            raise ValueError(f"{name} must be on {like.device}, got {mask.device}")
        mask = mask.bool()
        return None if bool(mask.all()) else mask

    def _check_memory(self, memory: object, batch_size: int) -> Tensor:
        if memory is None:
            return self.init_memory(batch_size)
        c = self.config
        if not isinstance(memory, Tensor):
            raise TypeError(f"memory must be a torch.Tensor or None, got {type(memory).__name__}")
        expected = [batch_size, c.n_memory_slots, c.d_model]
        if list(memory.shape) != expected:
            raise ValueError(
                f"memory must have shape {expected} [B, S, D], got {list(memory.shape)}"
            )
        if memory.dtype != c.memory_dtype:
            raise TypeError(
                f"memory must have dtype memory_dtype={c.memory_dtype}, got {memory.dtype}"
            )
        if memory.device != self.device:
            raise ValueError(
                f"memory must be on the model's device {self.device}, got {memory.device}"
            )
        return memory

    def _check_resets(
        self, name: str, resets: object, shape: list[int], meaning: str
    ) -> Tensor | None:
        """``resets`` is None or a bool tensor of exactly ``shape`` on the model's device."""
        if resets is None:
            return None
        if not isinstance(resets, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(resets).__name__}")
        if resets.dtype != torch.bool:
            raise TypeError(
                f"{name} must be a bool tensor (True = restart that row's memory), "
                f"got {resets.dtype}"
            )
        if list(resets.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} {meaning}, got {list(resets.shape)}")
        if resets.device != self.device:
            raise ValueError(
                f"{name} must be on the model's device {self.device}, got {resets.device}"
            )
        return resets

    def reset_memory(self, memory: Tensor, reset: Tensor) -> Tensor:
        """``memory [B, S, D]`` with the rows where ``reset [B]`` is True replaced by the initial
        memory ``M_0``: differentiable in both (the memory bias gets the gradient of the reset
        rows, ``memory`` that of the others), no host synchronisation."""
        return torch.where(reset[:, None, None], self.init_memory(memory.shape[0]), memory)

    def _check_labels(self, labels: object, like: Tensor) -> Tensor:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}")
        if labels.shape != like.shape:
            raise ValueError(f"labels must have shape {list(like.shape)}, got {list(labels.shape)}")
        if labels.device != like.device:
            raise ValueError(f"labels must be on {like.device}, got {labels.device}")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be token ids in [0, {self.config.vocab_size}) or {IGNORE_INDEX}, "
                f"got {labels[bad][0].item()}"
            )
        return labels.long()

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
        return self.norm(h), self.writer(memory, h, mask)

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
            h = block(h, memory, attn_mask, None if caches is None else caches[i])
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
            h = block(h, context, mask, context_mask, None if caches is None else caches[i])
        assert self.decoder_norm is not None
        return self.lm_head(self.decoder_norm(h))

    def _shift_right(self, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: ``[BOS, ids[:-1]]`` and the matching mask (BOS is always real)."""
        bos = ids.new_full((ids.shape[0], 1), self.config.bos_token_id)
        shifted = torch.cat([bos, ids[:, :-1].clamp_min(0)], dim=1)
        if mask is None:
            return shifted, None
        return shifted, torch.cat([mask.new_ones(mask.shape[0], 1), mask[:, :-1]], dim=1)

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
        input_ids = self._check_ids("input_ids", input_ids, c.segment_length)
        mask = self._check_mask("attention_mask", attention_mask, input_ids)
        reset = self._check_resets("reset", reset, [input_ids.shape[0]], "[B]")
        given = memory is not None
        memory = self._check_memory(memory, input_ids.shape[0])
        if reset is not None and given:  # without a memory every row starts from M_0 anyway
            memory = self.reset_memory(memory, reset)
        context, new_memory = self.read_segment(input_ids, memory, mask)
        logits = loss = None
        if self.is_encoder_decoder:
            if labels is not None:
                labels = self._check_labels(labels, labels)
                if labels.shape[0] != input_ids.shape[0]:
                    raise ValueError(
                        f"labels must have batch size {input_ids.shape[0]}, got {labels.shape[0]}"
                    )
            if decoder_input_ids is None and labels is not None:
                decoder_input_ids, _ = self._shift_right(labels, None)
            if decoder_input_ids is not None:
                decoder_input_ids = self._check_ids(
                    "decoder_input_ids", decoder_input_ids, c.segment_length
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
                labels = self._check_labels(labels, input_ids)
                targets = (
                    labels[:, 1:]
                    if mask is None
                    else labels[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
                )
                loss = _segment_loss(logits[:, :-1], targets)
        return MemformerOutput(logits=logits, memory=new_memory, loss=loss)

    # ------------------------------------------------------------------ rollouts

    def plan_rollout(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        resets: Tensor | None = None,
    ) -> Rollout:
        """Validate a rollout ``[B, T*L]`` and cut it into segments with their targets.

        Decoder: step ``t`` predicts each token's successor (the last token of a segment predicts
        the first of the next). Encoder-decoder: step ``t`` decodes segment ``t + 1``, so the
        first segment is context only. Padded positions (``attention_mask == 0``) and labels equal
        to -100 are not scored. ``resets [B, T]`` (bool, ``T = ceil(len / segment_length)``):
        row ``b`` restarts from the initial memory before segment ``t`` where ``resets[b, t]``;
        it changes the memory only, not which tokens are scored.
        """
        input_ids = self._check_ids("input_ids", input_ids)
        mask = self._check_mask("attention_mask", attention_mask, input_ids)
        L = self.config.segment_length
        resets = self._check_resets(
            "resets",
            resets,
            [input_ids.shape[0], -(-input_ids.shape[1] // L)],
            f"[B, T] (one flag per segment of segment_length={L})",
        )
        labels = input_ids if labels is None else self._check_labels(labels, input_ids)
        if mask is not None:
            labels = labels.masked_fill(~mask, IGNORE_INDEX)
        ids = list(input_ids.split(L, dim=1))
        masks: list[Tensor | None] = (
            list(mask.split(L, dim=1)) if mask is not None else [None] * len(ids)
        )
        if self.is_encoder_decoder:
            step_labels = list(labels.split(L, dim=1))[1:] + [None]
            shifted = [self._shift_right(i, m) for i, m in zip(ids[1:], masks[1:])] + [(None, None)]
            decoder_inputs = [s[0] for s in shifted]
            decoder_masks = [s[1] for s in shifted]
        else:
            nxt = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)
            step_labels = list(nxt.split(L, dim=1))
            decoder_inputs = decoder_masks = [None] * len(ids)
        counts = [0 if t is None else int((t != IGNORE_INDEX).sum()) for t in step_labels]
        targets = [t if n > 0 else None for t, n in zip(step_labels, counts)]
        if sum(counts) == 0:
            reason = "every label is ignored or padded"
            if self.is_encoder_decoder and len(ids) < 2:
                reason = "the encoder-decoder model predicts segment t + 1: it needs two segments"
            raise ValueError(f"the rollout has no token to predict: {reason}")
        active = self.training and self.config.dropout > 0
        seed = randomness.draw_rollout_seed() if active else None
        columns: list[Tensor | None] | None = None
        if resets is not None:  # one host sync per rollout: which segments reset any row
            columns = [
                resets[:, t] if any_reset else None
                for t, any_reset in enumerate(resets.any(0).tolist())
            ]
        return Rollout(
            ids, masks, targets, decoder_inputs, decoder_masks, sum(counts), seed, columns
        )

    def rollout_logits(
        self,
        rollout: Rollout,
        t: int,
        memory: Tensor,
        seed: int | None = None,
        with_logits: bool = True,
    ) -> tuple[Tensor | None, Tensor]:
        """Segment ``t`` of a rollout: ``(logits of its targets or None, M_{t+1})``.

        The rows that reset before step ``t`` read the initial memory instead of ``memory``. The
        logits (``[B, L', V]``, aligned with ``rollout.targets[t]``) are None when
        ``with_logits`` is False or the step has nothing to predict (then the decoder does not
        run). ``seed`` is the segment's dropout seed (:func:`randomness.segment_seed`); None draws
        from the global generators as they are.
        """
        reset = None if rollout.resets is None else rollout.resets[t]
        if reset is not None:
            memory = self.reset_memory(memory, reset)
        with randomness.seeded(randomness.part_seed(seed, randomness.ENCODER), self.device):
            context, new_memory = self.read_segment(rollout.input_ids[t], memory, rollout.masks[t])
        if not with_logits or rollout.targets[t] is None:
            return None, new_memory
        with randomness.seeded(randomness.part_seed(seed, randomness.DECODER), self.device):
            logits = self.decode(
                rollout.decoder_inputs[t], context, rollout.masks[t], rollout.decoder_masks[t]
            )
        return logits, new_memory

    def rollout_step(
        self,
        rollout: Rollout,
        t: int,
        memory: Tensor,
        seed: int | None = None,
        with_loss: bool = True,
    ) -> tuple[Tensor | None, Tensor]:
        """Segment ``t`` of a rollout: ``(loss share or None, M_{t+1})``.

        The loss share is the segment's summed cross-entropy divided by the rollout's target
        count; it is None when ``with_loss`` is False or the step has nothing to predict. See
        :meth:`rollout_logits` for resets and ``seed``.
        """
        logits, new_memory = self.rollout_logits(rollout, t, memory, seed, with_loss)
        targets = rollout.targets[t]
        if logits is None or targets is None:
            return None, new_memory
        loss_sum = F.cross_entropy(
            _upcast(logits).flatten(0, 1),
            targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss_sum / rollout.num_targets, new_memory

    def sequence_loss(
        self,
        input_ids: Tensor,
        memory: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Full back-propagation through time over a rollout ``[B, T*L]``: ``(loss, M_T)``.

        ``loss`` is the mean cross-entropy over every predicted, non-ignored token; ``labels``
        default to ``input_ids`` and are shifted inside (HF causal-LM convention). This keeps every
        segment's activations alive: it is the ground truth that ``mrbp.backward`` reproduces.

        ``resets [B, T]`` (bool, keyword-only; ``T`` segments, the last may be partial): row
        ``b`` restarts from the initial memory before segment ``t`` where ``resets[b, t]``, for
        batch rows packed with several documents. The initial memory's bias gets the gradient of
        every reset point. Resets change the memory only: to score a reset row exactly as a fresh
        run of it, also set to -100 the labels a fresh run would not predict (decoder: the first
        token of the reset segment; encoder-decoder: the whole reset segment).
        """
        rollout = self.plan_rollout(input_ids, attention_mask, labels, resets=resets)
        memory = self._check_memory(memory, rollout.input_ids[0].shape[0])
        total: Tensor | None = None
        for t in range(len(rollout)):
            seed = None if rollout.seed is None else randomness.segment_seed(rollout.seed, t)
            loss, memory = self.rollout_step(rollout, t, memory, seed)
            if loss is not None:
                total = loss if total is None else total + loss
        assert total is not None
        return total, memory

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        memory: Tensor | None = None,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        reset: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield ``max_new_tokens`` tokens ``[B]`` one at a time, in constant memory.

        The prompt ``[B, P]`` is cut into segments from its start, exactly as ``sequence_loss``
        cuts a rollout; completed segments are written into the memory and dropped, so memory use
        does not grow with the output. ``temperature=0`` is greedy decoding; otherwise sampling
        (optionally from the ``top_k`` most likely tokens). ``reset [B]`` (bool): the rows where it
        is True start from the initial memory instead of ``memory`` (their prompt begins a new
        document).
        """
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        prompt_ids = self._check_ids("prompt_ids", prompt_ids)
        reset = self._check_resets("reset", reset, [prompt_ids.shape[0]], "[B]")
        given = memory is not None
        memory = self._check_memory(memory, prompt_ids.shape[0])
        if reset is not None and given:
            memory = self.reset_memory(memory, reset)
        L = self.config.segment_length
        chunks = list(prompt_ids.split(L, dim=1))
        # A trailing partial chunk is the start of the segment being generated, except in the
        # encoder-decoder model when it is the whole prompt: then it is a short context segment.
        partial = chunks[-1].shape[1] < L and not (self.is_encoder_decoder and len(chunks) == 1)
        current = chunks.pop() if partial else None
        context: Tensor | None = None
        for chunk in chunks:
            context, memory = self.read_segment(chunk, memory)
        bos = prompt_ids.new_full((prompt_ids.shape[0], 1), self.config.bos_token_id)
        # The segment being generated lives in key/value caches (at most L positions), so each
        # new token costs one position's work; complete segments are written and dropped.
        if self.is_encoder_decoder:
            assert context is not None
            dec_caches = self._new_caches(pairs=True)
            first = bos if current is None else torch.cat([bos, current], dim=1)
            logits = self.decode(first, context, caches=dec_caches)[:, -1]
        else:
            caches = self._new_caches()
            hidden: list[Tensor] = []  # the current segment's final hidden states, for the writer
            if current is not None:
                hidden.append(self._run_blocks(current, memory, caches=caches))
                logits = self.lm_head(self.norm(hidden[-1][:, -1]))
            else:
                assert context is not None
                logits = self.lm_head(context[:, -1])
        length = 0 if current is None else current.shape[1]
        for _ in range(max_new_tokens):
            token = _sample(logits.float(), temperature, top_k, generator)
            yield token
            length += 1
            if self.is_encoder_decoder:
                current = (
                    token[:, None] if current is None else torch.cat([current, token[:, None]], 1)
                )
                if length == L:  # segment complete: encode and write it, decode the next one
                    context, memory = self.read_segment(current, memory)
                    current, length = None, 0
                    dec_caches = self._new_caches(pairs=True)
                    logits = self.decode(bos, context, caches=dec_caches)[:, -1]
                else:
                    assert context is not None
                    logits = self.decode(token[:, None], context, caches=dec_caches)[:, -1]
            else:
                hidden.append(self._run_blocks(token[:, None], memory, caches=caches))
                logits = self.lm_head(self.norm(hidden[-1][:, -1]))
                if length == L:  # segment complete: write it and start the next one
                    memory = self.writer(memory, torch.cat(hidden, dim=1))
                    caches, hidden, length = self._new_caches(), [], 0

    def _new_caches(self, pairs: bool = False) -> list:
        """Empty key/value caches: one per memory-reading block, or a (self, cross) pair per
        decoder block."""
        if pairs:
            return [(KVCache(), KVCache()) for _ in self.decoder]
        return [KVCache() for _ in self.blocks]

    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        memory: Tensor | None = None,
        *,
        reset: Tensor | None = None,
        **sampling: Any,
    ) -> Tensor:
        """The ``max_new_tokens`` tokens ``[B, max_new_tokens]`` that follow ``prompt_ids``.

        See :meth:`stream` for the sampling options, ``reset [B]`` and the segmentation.
        """
        tokens = list(self.stream(prompt_ids, max_new_tokens, memory, reset=reset, **sampling))
        if not tokens:
            return prompt_ids.new_empty(prompt_ids.shape[0], 0, dtype=torch.long)
        return torch.stack(tokens, dim=1)


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
    return F.cross_entropy(_upcast(logits).flatten(0, 1), targets.flatten())


def _upcast(logits: Tensor) -> Tensor:
    """Cross-entropy in at least float32 (float64 stays float64)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


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
