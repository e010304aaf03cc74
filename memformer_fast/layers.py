"""Memformer's building blocks as drop-in ``nn.Module``s (docs/design.md, "The three operations").

Every block is pre-LayerNorm with a residual around each sublayer. Hidden states are
``[B, L, D]``; the memory is ``[B, S, D]``. The memory reader and writer are public layers a user
can put into a model of their own; their attention runs through :mod:`memformer_fast.functional`.

Validation happens once, where a caller hands tensors in: each layer's ``forward`` checks its
inputs unless called with ``validate=False``, which a parent layer (or the model) passes to its
children after checking what it hands them; the layers call ``functional``'s unchecked twins with
the tensors they build themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakTensorKeyDictionary

from . import functional, randomness
from .randomness import Dropout


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    """``[B, L, D]`` -> ``[B, L, H, Dh]`` as a view (the flash-attention layout)."""
    return x.unflatten(-1, (n_heads, -1))


def _swap_halves(x: Tensor) -> Tensor:
    """``x: [..., Dh]`` with its two rotary halves swapped, ``[x2, x1, rest]``, in one operator
    (an odd ``Dh`` leaves a last feature ``rest``)."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    if head_dim % 2 == 0:  # the flip of a view, whose backward is one flip too
        return x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.cat([x[..., half : 2 * half], x[..., :half], x[..., 2 * half :]], -1)


def rotary_frequencies(head_dim: int, base: float) -> Tensor:
    """``inv_freq [head_dim // 2]`` (float32): ``base ** (-2i / rotary_dim)``, where
    ``rotary_dim`` is ``head_dim`` rounded down to even."""
    rotary_dim = head_dim - head_dim % 2
    return base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def rotary_tables(
    inv_freq: Tensor, head_dim: int, positions: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Rotary tables ``(cos, sin) [P, head_dim]`` for the positions ``[P]`` (float32), such that
    :func:`apply_rotary` is ``[x1 cos - x2 sin, x2 cos + x1 sin, rest]``.

    ``inv_freq: [head_dim // 2]``; ``cos = [c, c, 1]`` and ``sin = [-s, s, 0]`` along the head
    dimension (an odd ``head_dim`` leaves its last feature unrotated), computed in float32 and
    rounded to ``dtype`` once.
    """
    angles = positions[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    rest = head_dim - 2 * inv_freq.shape[0]
    ones, zeros = cos.new_ones(cos.shape[0], rest), cos.new_zeros(cos.shape[0], rest)
    return torch.cat([cos, cos, ones], -1).to(dtype), torch.cat([-sin, sin, zeros], -1).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x: [..., Dh]`` with tables from :func:`rotary_tables`
    broadcastable to ``x``: four operators forward and four backward, whatever the layout.

    Exactly ``x1 * cos - x2 * sin`` (and ``x2 * cos + x1 * sin``): the table holds ``-sin``, and
    ``a + b * (-s)`` rounds as ``a - b * s``.
    """
    return x * cos + _swap_halves(x) * sin


def check_states(name: str, t: object, width: int, meaning: str) -> Tensor:
    """``t`` is a floating ``[B, *, width]`` tensor, or a TypeError/ValueError names ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 3 or t.shape[-1] != width or 0 in t.shape:
        raise ValueError(f"{name} must have shape [B, *, {width}] ({meaning}), got {list(t.shape)}")
    return t


def check_pair(name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    """``t`` has the batch size and device of ``other``."""
    if t.shape[0] != other.shape[0]:
        raise ValueError(
            f"{name} must have the batch size of {other_name} ({other.shape[0]}), got {t.shape[0]}"
        )
    if t.device != other.device:
        raise ValueError(
            f"{name} must be on the device of {other_name} ({other.device}), got {t.device}"
        )


def check_attention_mask(
    name: str, mask: object, x: Tensor, heads: int, key_length: int | None = None
) -> None:
    """``mask`` is None or a bool SDPA mask broadcastable to ``[B, H, Lq, Lk]`` for queries ``x:
    [B, Lq, D]`` (``Lk`` defaults to ``Lq``), on ``x``'s device; else a TypeError/ValueError.

    Only bool is taken: SDPA adds a float mask to the logits, so a 0/1 float mask would let every
    position through (padding and the future included).
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = may attend), got {mask.dtype}: SDPA would add "
            "it to the attention logits instead of masking; build one with attention_mask_2d"
        )
    batch, length = x.shape[0], x.shape[1]
    keys = length if key_length is None else key_length
    shape = list(mask.shape)
    if (
        mask.dim() != 4
        or shape[0] not in (1, batch)
        or shape[1] not in (1, heads)
        or shape[2] not in (1, length)
        or shape[3] != keys
    ):
        raise ValueError(
            f"{name} must have shape [{batch} or 1, {heads} or 1, {length} or 1, {keys}] "
            f"([B, H, Lq, Lk], True = may attend; attention_mask_2d builds it from a [B, L] "
            f"mask), got {shape}"
        )
    if mask.device != x.device:
        raise ValueError(
            f"{name} must be on the device of the hidden states ({x.device}), got {mask.device}"
        )


def check_key_mask(name: str, mask: object, batch: int, length: int, device: torch.device) -> None:
    """``mask`` is None or a bool ``[batch, length]`` tensor (True = real token) on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {mask.dtype}")
    if list(mask.shape) != [batch, length]:
        raise ValueError(
            f"{name} must have shape [{batch}, {length}] ([B, L]), got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{name} must be on {device}, got {mask.device}")


def check_memory_states(memory: object, h: Tensor, h_name: str) -> Tensor:
    """``memory`` is a floating ``[B, S, D]`` tensor with the batch size and device of ``h``."""
    memory = check_states("memory", memory, h.shape[-1], "[B, S, D] memory slots")
    check_pair("memory", memory, h_name, h)
    return memory


def check_context(
    context: object,
    mask: object,
    x: Tensor,
    x_name: str,
    names: tuple[str, str, str] = ("context", "context_mask", "[B, Lk, D] encoder output"),
) -> None:
    """``context`` is a floating ``[B, Lk, D]`` tensor with the batch size and device of ``x``,
    and ``mask`` None or a bool ``[B, Lk]`` key mask (``names``: how the three are called)."""
    name, mask_name, meaning = names
    context = check_states(name, context, x.shape[-1], meaning)
    check_pair(name, context, x_name, x)
    check_key_mask(mask_name, mask, context.shape[0], context.shape[1], context.device)


def attention_mask_2d(
    key_mask: Tensor | None, length: int, causal: bool, device: torch.device
) -> Tensor | None:
    """Boolean SDPA mask ``[B | 1, 1, L, L]`` (True = may attend) from a ``[B, L]`` key mask.

    A query always sees itself, so a padded query never meets a row of -inf (no NaN) while real
    queries never see padded keys.
    """
    if key_mask is None:  # nothing to mask, or causal alone: SDPA's is_causal does it
        return None
    seen = key_mask[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=device)
    if not causal:
        return seen
    return seen & torch.ones(length, length, dtype=torch.bool, device=device).tril()


# Additive SDPA masks derived from bool masks, per mask tensor: every block of a segment gets the
# same mask object, so it is converted once per segment, not once per attention layer.
_ADDITIVE_MASKS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _additive_mask(
    mask: Tensor,
    dtype: torch.dtype,
    context: bool = False,
    causal: tuple[int, int] | None = None,
) -> Tensor:
    """The float mask SDPA would make of ``mask`` (0 where True, -inf where False), in ``dtype``.

    ``mask``: a bool ``[B | 1, 1, Lq, Lk]`` attention mask, or with ``context`` a ``[B, Lk]`` key
    mask of a cross-attention, where a row with no real key attends to all of them (no row of
    -inf, no NaN) -> ``[B, 1, 1, Lk]``. With ``causal = (Lq, Lk)`` the mask is also causal (query
    ``i`` sees keys up to ``i + Lk - Lq``): a causal layer stays causal whatever mask it is given
    (an all-True or ``[B, 1, 1, Lk]`` key mask would otherwise let it see the future). Cached per
    mask tensor, its version (an in-place change rebuilds it), ``dtype`` and ``causal``; built
    inline under ``torch.compile``. Passing SDPA the float mask is bit-identical to passing the
    bool one, which it converts the same way.
    """
    compiling = torch.compiler.is_compiling()
    key = (dtype, context, causal)
    entries = None if compiling else _ADDITIVE_MASKS.get(mask)
    if entries is not None and key in entries:
        version, additive = entries[key]
        if version == mask._version and not (
            additive.is_inference() and not torch.is_inference_mode_enabled()
        ):
            return additive
    allowed = mask
    if context:
        allowed = mask[:, None, None, :] | ~mask.any(-1)[:, None, None, None]
    if causal is not None:
        q_len, k_len = causal
        past = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
        allowed = allowed & past
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~allowed, float("-inf")
    )
    if not compiling:
        if entries is None:
            entries = _ADDITIVE_MASKS[mask] = {}
        entries[key] = (mask._version, additive)
    return additive


class KVCache:
    """Keys and values ``[B, H, T, Dh]`` of one attention layer, for token-by-token decoding.

    Generation keeps one per layer for the segment being written: at most ``segment_length``
    entries, dropped when the segment is complete, so memory stays constant.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' ``k, v: [B, H, n, Dh]``; return every cached position."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions within the segment.

    Attention projections carry no bias: a key bias only shifts every logit of a row equally, so
    softmax ignores it and its gradient is rounding noise.

    ``forward(x: [B, L, D], mask: [B | 1, 1, L, L] bool or None) -> [B, L, D]``
    """

    inv_freq: Tensor

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        inv_freq = rotary_frequencies(d_model // n_heads, rope_base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (inv_freq, (its version, dtype), cos, sin): the tables of _rotary_tables.
        self._tables: tuple[Tensor, tuple[int, torch.dtype], Tensor, Tensor] | None = None

    def _rotary_tables(self, offset: int, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin) [length, 3, 1, Dh]`` for positions ``offset ..`` of the ``[B, L, 3, H,
        Dh]`` projections: queries and keys rotate, values pass (cos 1, sin 0).

        Cached between calls, and rebuilt when ``inv_freq`` is replaced or written (``to()``, a
        checkpoint loader), the dtype changes, more positions are needed, or a table made under
        ``inference_mode`` would meet autograd. Built inline under ``torch.compile``.
        """
        needed = offset + length
        source = self.inv_freq
        compiling = torch.compiler.is_compiling()
        cached = None if compiling else self._tables
        if cached is not None and (
            cached[0] is not source  # replaced, by to() or a loader
            or cached[1] != (source._version, dtype)  # written in place, or another dtype
            or cached[2].shape[0] < needed
            or (cached[2].is_inference() and not torch.is_inference_mode_enabled())
        ):
            cached = None
        if cached is None:
            head_dim = self.qkv.in_features // self.n_heads
            # Whole powers of two (at least 64 positions): token-by-token decoding rebuilds the
            # tables a few times per segment length, not at every token.
            size = needed if compiling else max(64, 1 << (needed - 1).bit_length())
            positions = torch.arange(size, device=source.device, dtype=torch.float32)
            cos, sin = rotary_tables(source, head_dim, positions, dtype)
            cos = torch.stack([cos, cos, torch.ones_like(cos)], 1)[:, :, None]
            sin = torch.stack([sin, sin, torch.zeros_like(sin)], 1)[:, :, None]
            cached = (source, (source._version, dtype), cos, sin)
            if not compiling:
                self._tables = cached
        return cached[2][offset:needed], cached[3][offset:needed]

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        *,
        validate: bool = True,
    ) -> Tensor:
        """With ``cache``, ``x`` holds the positions that follow the cached ones (causal, no
        ``mask``): their keys and values join the cache. ``validate=False``: the caller checked
        ``x`` and ``mask``."""
        if validate:
            check_states("x", x, self.qkv.in_features, "[B, L, D] hidden states")
            check_attention_mask("mask", mask, x, self.n_heads)
        offset = 0 if cache is None else len(cache)
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))  # [B, L, 3, H, Dh]
        cos, sin = self._rotary_tables(offset, x.shape[1], qkv.dtype)
        # One rotation over the three projections (values pass unchanged) and no split before
        # it: its backward is a handful of operators, not one per half of q and k. Unbinding
        # before transposing makes the backward stack the gradients contiguously (no copy).
        q, k, v = (t.transpose(1, 2) for t in apply_rotary(qkv, cos, sin).unbind(2))
        if cache is not None:
            k, v = cache.append(k, v)
            if offset > 0:  # new queries see every cached position and the new ones causally
                n = x.shape[1]
                mask = torch.ones(n, offset + n, dtype=torch.bool, device=x.device).tril(offset)
                is_causal = False
        # Causal means causal whatever the mask: a given mask is intersected with the causal one
        # (SDPA takes either is_causal or a mask, not both).
        causal = (q.shape[2], k.shape[2]) if is_causal and mask is not None else None
        bias = None if mask is None else _additive_mask(mask, q.dtype, causal=causal)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, is_causal=is_causal and mask is None
        )
        return self.out(o.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention (encoder-decoder architecture).

    ``forward(x: [B, Lq, D], context: [B, Lk, D], context_mask: [B, Lk] bool or None)``
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_mask: Tensor | None,
        cache: KVCache | None = None,
        *,
        validate: bool = True,
    ) -> Tensor:
        """``cache`` keeps the context's keys and values, computed once per context.
        ``validate=False``: the caller checked the arguments."""
        if validate:
            check_states("x", x, self.q.in_features, "[B, Lq, D] hidden states")
            check_context(context, context_mask, x, "x")
        q = _split_heads(self.q(x), self.n_heads).transpose(1, 2)
        if cache is not None and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v
        else:
            k, v = (
                _split_heads(t, self.n_heads).transpose(1, 2) for t in self.kv(context).chunk(2, -1)
            )
            if cache is not None:
                cache.append(k, v)
        bias = None
        if context_mask is not None:  # a batch row with no real context token attends to all of it
            bias = _additive_mask(context_mask, q.dtype, context=True)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(o.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    """``Linear(D, d_ff) -> GELU -> Linear(d_ff, D)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


class MemoryReader(nn.Module):
    """Tokens read the memory: ``Wo . memory_read_attention(LN(h) Wq, LN_m(M) Wk, LN_m(M) Wv)``.

    ``forward(h: [B, L, D], memory: [B, S, D]) -> [B, L, D]``, the update to add to ``h``.
    The memory may be kept in another dtype (float32) than ``h``; keys and values follow ``h``.
    Shapes, dtypes and devices are checked: a bad argument raises a TypeError or ValueError.
    """

    def __init__(
        self, d_model: int, n_heads: int, backend: str = "auto", eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.n_heads, self.backend = n_heads, backend
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.memory_norm = nn.LayerNorm(d_model, eps=eps)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, h: Tensor, memory: Tensor, *, validate: bool = True) -> Tensor:
        """``validate=False``: the caller checked ``h`` and ``memory``."""
        if validate:
            check_states("h", h, self.q.in_features, "[B, L, D] hidden states")
            check_memory_states(memory, h, "h")
        q = _split_heads(self.q(self.norm(h)), self.n_heads)
        # The memory follows h's dtype here, so a bfloat16 model reads a float32 memory.
        kv = self.kv(self.memory_norm(memory.to(h.dtype)))
        k, v = (_split_heads(t, self.n_heads) for t in kv.chunk(2, -1))
        o = functional._memory_read_attention(q, k.to(q.dtype), v.to(q.dtype), None, self.backend)
        return self.out(o.flatten(2))


class MemoryWriter(nn.Module):
    """Writes a segment into the memory and owns the memory's initial state ("Memory write" in
    docs/design.md).

    Each slot attends over itself (key from its normalised slot, value the raw slot) and the
    segment's tokens (with ``rotary``, their keys rotated by the position relative to the
    segment's last token + 1, where the slots stand: attention by recency); the result is gated
    against the old slot, the bias is added and every slot is renormalised (BMN).
    ``forward(memory: [B, S, D], x: [B, L, D], token_mask: [B, L] bool or None) -> [B, S, D]`` in
    the memory's dtype. A batch row whose segment is all padding keeps its memory.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_slots: int,
        temperature: float = 0.5,
        gate: bool = True,
        backend: str = "auto",
        eps: float = 1e-5,
        bias_init_norm: float = 0.001,
        gate_bias_init: float = 0.0,
        noise: float = 0.0,
        rotary: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        # Checked here once: forward hands it to functional's unchecked write.
        temperature = functional._check_positive("temperature", temperature)
        self.n_heads, self.temperature, self.backend = n_heads, temperature, backend
        self.noise, self.eps = noise, eps
        self.memory_norm = nn.LayerNorm(d_model, eps=eps)
        self.token_norm = nn.LayerNorm(d_model, eps=eps)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)  # shared by slots and tokens
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(2 * d_model, d_model) if gate else None
        self.bias = nn.Parameter(torch.empty(n_slots, d_model))
        self.bias_init_norm, self.gate_bias_init = bias_init_norm, gate_bias_init
        self.inv_freq: Tensor | None
        freq = rotary_frequencies(d_model // n_heads, rope_base) if rotary else None
        self.register_buffer("inv_freq", freq, persistent=False)
        self.reset_memory_parameters()

    def reset_memory_parameters(self) -> None:
        """Small-norm memory bias and the gate bias (``gate_bias_init``; 0: half open)."""
        with torch.no_grad():
            nn.init.normal_(self.bias)
            self.bias.mul_(self.bias_init_norm / self.bias.norm(dim=-1, keepdim=True))
            if self.gate is not None:
                nn.init.constant_(self.gate.bias, self.gate_bias_init)

    def initial_memory(self, batch_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``M_0 = bias / ||bias||`` per slot, ``[batch_size, S, D]`` (differentiable in bias)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        m0 = F.normalize(self.bias.to(dtype), dim=-1)
        return m0.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(
        self, memory: Tensor, x: Tensor, token_mask: Tensor | None = None, *, validate: bool = True
    ) -> Tensor:
        """``validate=False``: the caller checked the arguments."""
        if validate:
            check_states("memory", memory, self.q.in_features, "[B, S, D] memory slots")
            if memory.shape[1] != self.bias.shape[0]:
                raise ValueError(
                    f"memory must have {self.bias.shape[0]} slots ([B, S, D] with S = n_slots), "
                    f"got shape {list(memory.shape)}"
                )
            check_context(x, token_mask, memory, "memory", ("x", "token_mask", "[B, L, D]"))
        # The projections run in x's dtype (a bfloat16 model with a float32 memory works); the
        # update itself stays in the memory's dtype.
        raw = memory.to(x.dtype)
        m = self.memory_norm(raw)
        q = _split_heads(self.q(m), self.n_heads)
        k_self = _split_heads(self.k(m), self.n_heads)
        tokens = self.token_norm(x)
        k = _split_heads(self.k(tokens), self.n_heads)
        if self.inv_freq is not None:
            k = self._rotate_by_recency(k, token_mask)
        v = _split_heads(self.v(tokens), self.n_heads)
        dtype = q.dtype
        written = (
            functional._memory_write_attention(
                q,
                k_self.to(dtype),
                _split_heads(raw, self.n_heads).to(dtype),
                k.to(dtype),
                v.to(dtype),
                token_mask,
                self.temperature,
                None,
                self.backend,
            )
            .flatten(2)
            .to(memory.dtype)
        )
        gate_logits = None
        if self.gate is not None:
            gate_in = torch.cat([raw, written.to(raw.dtype)], dim=-1)
            gate_logits = self.gate(gate_in).to(memory.dtype)
        bias = self.bias.to(memory.dtype)
        new = functional._gated_memory_update(
            memory, written, bias, gate_logits, functional.BMN_EPS, self.backend
        )
        if self.training and self.noise > 0:  # MemformerConfig.memory_noise: norm ~ self.noise
            noise = randomness.standard_normal_like(new) * (self.noise / new.shape[-1] ** 0.5)
            new = F.normalize(new + noise, dim=-1, eps=self.eps)
        if token_mask is not None:  # padding-only rows (ends of ragged batches) change nothing
            new = torch.where(token_mask.any(-1)[:, None, None], new, memory)
        return new

    def _rotate_by_recency(self, k: Tensor, token_mask: Tensor | None) -> Tensor:
        """Token keys ``k [B, L, H, Dh]`` rotated to positions ``i - end`` (``end``: one past the
        row's last real token): the slots' queries and self-keys stay unrotated, at position 0,
        so a score depends on how many tokens back a key is, wherever the padding is."""
        assert self.inv_freq is not None
        batch, length = k.shape[:2]
        index = torch.arange(length, device=k.device, dtype=torch.float32)
        if token_mask is None:
            positions = (index - length).expand(batch, length)
        else:
            end = torch.where(token_mask, index + 1, 0).amax(-1, keepdim=True)
            positions = index - end
        freq = self.inv_freq.float()  # a model cast to bfloat16 keeps exact frequencies
        cos, sin = rotary_tables(freq, k.shape[-1], positions.reshape(-1), k.dtype)
        shape = (batch, length, 1, k.shape[-1])
        return apply_rotary(k, cos.view(shape), sin.view(shape))


class _PreNormBlock(nn.Module):
    """The pre-LN residual sublayers that :class:`MemoryBlock` and :class:`DecoderBlock` share:
    rotary self-attention first, feed-forward last. A block adds them with :meth:`_add_attention`
    and :meth:`_add_feed_forward` around its own sublayers, in forward order: the order of its
    parameters, which state dicts, optimiser states and the initialisation of a seed follow."""

    def _add_attention(self, d_model: int, n_heads: int, eps: float, rope_base: float) -> None:
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attn = RotarySelfAttention(d_model, n_heads, rope_base)

    def _add_feed_forward(self, d_model: int, d_ff: int, dropout: float, eps: float) -> None:
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff = FeedForward(d_model, d_ff)
        self.dropout = Dropout(dropout)

    def _check_inputs(self, h: Tensor, mask: Tensor | None) -> None:
        """``h`` is ``[B, L, D]`` hidden states and ``mask`` a self-attention mask for them."""
        check_states("h", h, self.attn_norm.normalized_shape[0], "[B, L, D] hidden states")
        check_attention_mask("mask", mask, h, self.attn.n_heads)

    def _attend(
        self, h: Tensor, mask: Tensor | None, causal: bool, cache: KVCache | None
    ) -> Tensor:
        return h + self.dropout(self.attn(self.attn_norm(h), mask, causal, cache, validate=False))

    def _feed_forward(self, h: Tensor) -> Tensor:
        return h + self.dropout(self.ff(self.ff_norm(h)))


class MemoryBlock(_PreNormBlock):
    """Self-attention, memory reader, feed-forward (each pre-LN with residual).

    Bidirectional in the encoder; causal in the decoder-only architecture (docs/design.md,
    "The model").

    ``forward(h: [B, L, D], memory: [B, S, D], mask) -> [B, L, D]``; ``mask`` from
    :func:`attention_mask_2d`.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        backend: str,
        causal: bool,
        eps: float = 1e-5,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.causal = causal
        self._add_attention(d_model, n_heads, eps, rope_base)
        self.reader = MemoryReader(d_model, n_heads, backend, eps)
        self._add_feed_forward(d_model, d_ff, dropout, eps)

    def forward(
        self,
        h: Tensor,
        memory: Tensor,
        mask: Tensor | None,
        cache: KVCache | None = None,
        *,
        validate: bool = True,
    ) -> Tensor:
        """``validate=False``: the caller checked the arguments."""
        if validate:
            self._check_inputs(h, mask)
            check_memory_states(memory, h, "h")
        h = self._attend(h, mask, self.causal, cache)
        h = h + self.dropout(self.reader(h, memory, validate=False))
        return self._feed_forward(h)


class DecoderBlock(_PreNormBlock):
    """Causal self-attention, cross-attention to the encoder output, feed-forward.

    ``forward(h: [B, L, D], context: [B, Lc, D], mask, context_mask: [B, Lc] or None)``
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        eps: float = 1e-5,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self._add_attention(d_model, n_heads, eps, rope_base)
        self.cross_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross = CrossAttention(d_model, n_heads)
        self._add_feed_forward(d_model, d_ff, dropout, eps)

    def forward(
        self,
        h: Tensor,
        context: Tensor,
        mask: Tensor | None,
        context_mask: Tensor | None,
        caches: tuple[KVCache, KVCache] | None = None,
        *,
        validate: bool = True,
    ) -> Tensor:
        """``caches``: the self- and cross-attention caches, for token-by-token decoding.
        ``validate=False``: the caller checked the arguments."""
        if validate:
            self._check_inputs(h, mask)
            check_context(context, context_mask, h, "h")
        self_cache, cross_cache = (None, None) if caches is None else caches
        h = self._attend(h, mask, True, self_cache)
        cross = self.cross(self.cross_norm(h), context, context_mask, cross_cache, validate=False)
        h = h + self.dropout(cross)
        return self._feed_forward(h)


def init_weights(module: nn.Module, std: float | None = None, embedding_std: float = 1.0) -> None:
    """Initialise every linear and embedding weight of ``module``.

    ``std=None`` (the default) keeps PyTorch's fan-in scaled initialisation of linear layers
    (weights and biases uniform in ``±1 / sqrt(fan_in)``), so the scale follows the width; a float
    draws weights from ``normal(0, std)`` with zero biases (GPT-style).
    Embeddings are ``normal(0, embedding_std)``: token identity must dominate the residual stream
    at init, or the memory writer sees a blur of its neighbours and single-key recall never starts
    (docs/memory_learning.md).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if std is None:
                m.reset_parameters()
            else:
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=embedding_std)
