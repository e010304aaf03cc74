"""Validation: bad input at every public entry point gives a clear Python exception and
changes nothing (``memformer_fast.validation``'s checks and each entry point's own).

Each case in ``CASES`` is one row of the table in ``docs/robustness.md``: the call, the exception
type and fragments its message must contain (the argument's name, what was expected and what was
given). Every case runs against a snapshot of all parameters, gradients, the carried memory, the
replay buffer and the op inputs, which must be bitwise unchanged afterwards. NaN and infinity in
data are not argument errors (but in a memory given to the model, which is refused): their
documented behaviour is tested at the end of the file.
"""

from __future__ import annotations

import functools
import pathlib
from types import SimpleNamespace

import pytest
import torch
from testing_utils import (
    BAD_CALL_MODEL,
    BAD_CALL_OPS,
    META,
    Case,
    assert_same,
    bad_call_env,
    check_case,
    tiny_config,
)

from memformer_fast import Memformer, ReplayBuffer, functional, mrbp
from memformer_fast.layers import attention_mask_2d

B, L, S, H, DH = BAD_CALL_OPS
VOCAB, WIDTH, SLOTS, SEG = (
    BAD_CALL_MODEL[k] for k in ("vocab_size", "d_model", "n_memory_slots", "segment_length")
)
make_config = functools.partial(tiny_config, **BAD_CALL_MODEL)
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "robustness.md"


def with_value(memory: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``memory`` holding ``value`` (NaN, an infinity) in one slot of batch row 1."""
    memory = memory.clone()
    memory[1, 0, 3] = value
    return memory


def make_buffer_env() -> SimpleNamespace:
    """Replay buffers: one holding a state, one full, one empty."""
    e = SimpleNamespace(memory=torch.randn(2, SLOTS, WIDTH))
    shape = (2, SLOTS, WIDTH)
    e.buffer = ReplayBuffer(2, shape, torch.float32, "cpu")
    e.buffer.push(e.memory, 5)
    e.full = ReplayBuffer(1, shape, torch.float32, "cpu")
    e.full.push(e.memory, 6)
    e.empty_buffer = ReplayBuffer(1, shape, torch.float32, "cpu")
    return e


@pytest.fixture(scope="module")
def env() -> SimpleNamespace:
    return bad_call_env()


@pytest.fixture(scope="module")
def buffer_env() -> SimpleNamespace:
    return make_buffer_env()


def read(e, **kw):
    args = dict(q=e.q, k=e.k, v=e.v)
    args.update(kw)
    return functional.memory_read_attention(**args)


def write(e, **kw):
    args = dict(q=e.qs, k_self=e.ks, v_self=e.vs, k=e.kt, v=e.vt, token_mask=e.mask)
    args.update(kw)
    return functional.memory_write_attention(**args)


def update(e, **kw):
    args = dict(memory=e.m, candidate=e.c, bias=e.bias, gate_logits=e.g)
    args.update(kw)
    return functional.gated_memory_update(**args)


def causal(e) -> torch.Tensor:
    """The blocks' bool SDPA mask ``[B, 1, L, L]`` for the env's segment (one padded key)."""
    keys = torch.ones(2, SEG, dtype=torch.bool)
    keys[1, -1] = False
    return attention_mask_2d(keys, SEG, True, torch.device("cpu"))


NAN, INF = float("nan"), float("inf")

CASES = [
    # ---- memory_read_attention
    Case("read-q-rank", lambda e: read(e, q=e.q[0]), ValueError,
         ("q must have shape", "[5, 2, 4]")),
    Case("read-k-batch", lambda e: read(e, k=e.k[:1], v=e.v[:1]), ValueError,
         ("k must have shape [2, *, 2, 4]", "got [1, 3, 2, 4]")),
    Case("read-k-heads", lambda e: read(e, k=e.k[:, :, :1], v=e.v[:, :, :1]), ValueError,
         ("k must have shape [2, *, 2, 4]", "got [2, 3, 1, 4]")),
    Case("read-k-head-dim", lambda e: read(e, k=e.k[..., :2], v=e.v[..., :2]), ValueError,
         ("k must have shape [2, *, 2, 4]", "got [2, 3, 2, 2]")),
    Case("read-v-slots", lambda e: read(e, v=e.v[:, :2]), ValueError,
         ("v must have shape [2, 3, 2, 4]", "got [2, 2, 2, 4]")),
    Case("read-dtype-mismatch", lambda e: read(e, k=e.k.double()), TypeError,
         ("k must have the dtype of q", "torch.float32", "torch.float64")),
    Case("read-device-mismatch", lambda e: read(e, v=e.v.to(META)), ValueError,
         ("v must be on the device of q", "cpu", "meta")),
    Case("read-int-q", lambda e: read(e, q=e.q.int()), TypeError,
         ("q must have a dtype in", "torch.int32")),
    Case("read-bool-k", lambda e: read(e, k=e.k.bool()), TypeError,
         ("k must have the dtype of q", "torch.bool")),
    Case("read-not-tensor", lambda e: read(e, q=e.q.tolist()), TypeError,
         ("q must be a torch.Tensor", "list")),
    Case("read-empty-batch", lambda e: read(e, q=e.q[:0], k=e.k[:0], v=e.v[:0]), ValueError,
         ("q must have no empty dimension", "[0, 5, 2, 4]")),
    Case("read-zero-slots", lambda e: read(e, k=e.k[:, :0], v=e.v[:, :0]), ValueError,
         ("k must have no empty dimension", "[2, 0, 2, 4]")),
    Case("read-scale-zero", lambda e: read(e, scale=0.0), ValueError,
         ("scale must be", "> 0", "0.0")),
    Case("read-scale-nan", lambda e: read(e, scale=NAN), ValueError, ("scale must be", "nan")),
    Case("read-backend-unknown", lambda e: read(e, backend="cuda"), ValueError,
         ("backend must be one of", "'cuda'")),
    # ---- memory_write_attention
    Case("write-k-self-shape", lambda e: write(e, k_self=e.ks[:, :2]), ValueError,
         ("k_self must have shape [2, 3, 2, 4]", "got [2, 2, 2, 4]")),
    Case("write-v-self-heads", lambda e: write(e, v_self=e.vs[:, :, :1]), ValueError,
         ("v_self must have shape [2, 3, 2, 4]", "got [2, 3, 1, 4]")),
    Case("write-k-batch", lambda e: write(e, k=e.kt[:1], v=e.vt[:1]), ValueError,
         ("k must have shape [2, *, 2, 4]", "got [1, 5, 2, 4]")),
    Case("write-v-tokens", lambda e: write(e, v=e.vt[:, :4]), ValueError,
         ("v must have shape [2, 5, 2, 4]", "got [2, 4, 2, 4]")),
    Case("write-dtype-mismatch", lambda e: write(e, v=e.vt.half()), TypeError,
         ("v must have the dtype of q", "torch.float16")),
    Case("write-device-mismatch", lambda e: write(e, k=e.kt.to(META)), ValueError,
         ("k must be on the device of q", "meta")),
    Case("write-int-v-self", lambda e: write(e, v_self=e.vs.long()), TypeError,
         ("v_self must have the dtype of q", "torch.int64")),
    Case("write-mask-float", lambda e: write(e, token_mask=e.mask.float()), TypeError,
         ("token_mask must be a bool tensor", "torch.float32")),
    Case("write-mask-shape", lambda e: write(e, token_mask=e.mask[:, :4]), ValueError,
         ("token_mask must have shape [2, 5]", "got [2, 4]")),
    Case("write-mask-device", lambda e: write(e, token_mask=e.mask.to(META)), ValueError,
         ("token_mask must be on cpu", "meta")),
    Case("write-empty-tokens", lambda e: write(e, k=e.kt[:, :0], v=e.vt[:, :0],
                                               token_mask=None), ValueError,
         ("k must have no empty dimension", "[2, 0, 2, 4]")),
    Case("write-temperature-zero", lambda e: write(e, temperature=0.0), ValueError,
         ("temperature must be", "> 0", "0.0")),
    Case("write-temperature-negative", lambda e: write(e, temperature=-1.0), ValueError,
         ("temperature must be", "-1.0")),
    Case("write-temperature-inf", lambda e: write(e, temperature=INF), ValueError,
         ("temperature must be a finite number", "inf")),
    Case("write-temperature-bool", lambda e: write(e, temperature=True), TypeError,
         ("temperature must be a float", "bool")),
    # ---- gated_memory_update
    Case("update-memory-rank", lambda e: update(e, memory=e.m[0]), ValueError,
         ("memory must have shape [*, *, *]", "got [3, 16]")),
    Case("update-candidate-width", lambda e: update(e, candidate=e.c[..., :8]), ValueError,
         ("candidate must have shape [2, 3, 16]", "got [2, 3, 8]")),
    Case("update-bias-batched", lambda e: update(e, bias=e.m), ValueError,
         ("bias must have shape [3, 16]", "got [2, 3, 16]")),
    Case("update-gate-slots", lambda e: update(e, gate_logits=e.g[:, :2]), ValueError,
         ("gate_logits must have shape [2, 3, 16]", "got [2, 2, 16]")),
    Case("update-dtype-mismatch", lambda e: update(e, bias=e.bias.bfloat16()), TypeError,
         ("bias must have the dtype of memory", "torch.bfloat16")),
    Case("update-device-mismatch", lambda e: update(e, gate_logits=e.g.to(META)), ValueError,
         ("gate_logits must be on the device of memory", "meta")),
    Case("update-int-memory", lambda e: update(e, memory=e.m.int()), TypeError,
         ("memory must have a dtype in", "torch.int32")),
    Case("update-zero-width", lambda e: update(e, memory=e.m[..., :0], candidate=e.c[..., :0],
                                               bias=e.bias[:, :0], gate_logits=None), ValueError,
         ("memory must have no empty dimension", "[2, 3, 0]")),
    Case("update-eps-zero", lambda e: update(e, eps=0.0), ValueError,
         ("eps must be", "> 0", "0.0")),
    Case("update-eps-negative", lambda e: update(e, eps=-1e-6), ValueError,
         ("eps must be", "-1e-06")),
    # ---- MemoryReader / MemoryWriter modules
    Case("reader-width", lambda e: e.reader(e.h[..., :8], e.memory), ValueError,
         ("h must have shape [B, *, 16]", "got [2, 4, 8]")),
    Case("reader-rank", lambda e: e.reader(e.h[0], e.memory), ValueError,
         ("h must have shape [B, *, 16]", "got [4, 16]")),
    Case("reader-batch", lambda e: e.reader(e.h, e.memory[:1]), ValueError,
         ("memory must have the batch size of h (2)", "got 1")),
    Case("reader-int-h", lambda e: e.reader(e.h.long(), e.memory), TypeError,
         ("h must be a floating-point tensor", "torch.int64")),
    Case("reader-device", lambda e: e.reader(e.h, e.memory.to(META)), ValueError,
         ("memory must be on the device of h", "meta")),
    Case("writer-slots", lambda e: e.dec.writer(e.memory[:, :2], e.h), ValueError,
         ("memory must have 3 slots", "got shape [2, 2, 16]")),
    Case("writer-width", lambda e: e.dec.writer(e.memory, e.h[..., :8]), ValueError,
         ("x must have shape [B, *, 16]", "got [2, 4, 8]")),
    Case("writer-batch", lambda e: e.dec.writer(e.memory, e.h[:1]), ValueError,
         ("x must have the batch size of memory (2)", "got 1")),
    Case("writer-mask-float", lambda e: e.dec.writer(e.memory, e.h, e.seg.float()), TypeError,
         ("token_mask must be a bool tensor", "torch.float32")),
    Case("writer-empty-batch", lambda e: e.dec.writer(e.memory[:0], e.h[:0]), ValueError,
         ("memory must have shape [B, *, 16]", "got [0, 3, 16]")),
    Case("writer-initial-memory-zero", lambda e: e.dec.writer.initial_memory(0), ValueError,
         ("batch_size must be a positive int", "got 0")),
    # ---- masks at the blocks and attention layers
    Case("block-mask-float", lambda e: e.dec.blocks[0](e.h, e.memory, causal(e).float()),
         TypeError, ("mask must be a bool tensor (True = may attend)", "torch.float32",
                     "attention_mask_2d")),
    Case("block-mask-key-shape", lambda e: e.dec.blocks[0](e.h, e.memory, e.seg > 0), ValueError,
         ("mask must have shape [2 or 1, 2 or 1, 4 or 1, 4]", "got [2, 4]")),
    Case("block-mask-length", lambda e: e.dec.blocks[0](e.h, e.memory, causal(e)[..., :3]),
         ValueError, ("mask must have shape [2 or 1, 2 or 1, 4 or 1, 4]", "got [2, 1, 4, 3]")),
    Case("block-mask-device", lambda e: e.dec.blocks[0](e.h, e.memory, causal(e).to(META)),
         ValueError, ("mask must be on the device of the hidden states (cpu)", "meta")),
    Case("block-mask-not-tensor", lambda e: e.dec.blocks[0](e.h, e.memory, [[True]]), TypeError,
         ("mask must be a bool torch.Tensor or None", "list")),
    Case("attention-mask-int", lambda e: e.dec.blocks[0].attn(e.h, causal(e).long()), TypeError,
         ("mask must be a bool tensor", "torch.int64")),
    Case("attention-x-width", lambda e: e.dec.blocks[0].attn(e.h[..., :8], None), ValueError,
         ("x must have shape [B, *, 16]", "got [2, 4, 8]")),
    Case("decoder-block-mask-float",
         lambda e: e.encdec.decoder[0](e.h, e.h, causal(e).float(), None), TypeError,
         ("mask must be a bool tensor", "torch.float32")),
    Case("decoder-block-context-mask-float",
         lambda e: e.encdec.decoder[0](e.h, e.h, None, (e.seg > 0).float()), TypeError,
         ("context_mask must be a bool tensor (True = real token)", "torch.float32")),
    Case("decoder-block-context-mask-shape",
         lambda e: e.encdec.decoder[0](e.h, e.h, None, causal(e)), ValueError,
         ("context_mask must have shape [2, 4] ([B, L])", "got [2, 1, 4, 4]")),
    Case("decoder-block-context-batch", lambda e: e.encdec.decoder[0](e.h, e.h[:1], None, None),
         ValueError, ("context must have the batch size of h (2)", "got 1")),
    Case("cross-attention-context-mask-length",
         lambda e: e.encdec.decoder[0].cross(e.h, e.h, (e.seg > 0)[:, :3]), ValueError,
         ("context_mask must have shape [2, 4] ([B, L])", "got [2, 3]")),
    Case("cross-attention-context-width",
         lambda e: e.encdec.decoder[0].cross(e.h, e.h[..., :8], None), ValueError,
         ("context must have shape [B, *, 16]", "got [2, 4, 8]")),
    # ---- Memformer.forward
    Case("forward-ids-rank", lambda e: e.dec(e.seg[0]), ValueError,
         ("input_ids must have shape [B, L]", "got [4]")),
    Case("forward-ids-float", lambda e: e.dec(e.seg.float()), TypeError,
         ("input_ids must hold integer token ids", "torch.float32")),
    Case("forward-ids-bool", lambda e: e.dec(e.seg.bool()), TypeError,
         ("input_ids must hold integer token ids", "torch.bool")),
    Case("forward-ids-out-of-vocab", lambda e: e.dec(e.seg + VOCAB), ValueError,
         ("input_ids must hold ids in [0, vocab_size=11)", "got values in [")),
    Case("forward-ids-negative", lambda e: e.dec(e.seg - VOCAB), ValueError,
         ("input_ids must hold ids in [0, vocab_size=11)", "got values in [-")),
    Case("forward-segment-too-long", lambda e: e.dec(e.ids), ValueError,
         ("input_ids has 8 tokens", "segment_length=4")),
    Case("forward-empty-batch", lambda e: e.dec(e.seg[:0]), ValueError,
         ("input_ids must have shape [B, L] with B, L >= 1", "got [0, 4]")),
    Case("forward-ids-device", lambda e: e.dec(e.seg.to(META)), ValueError,
         ("input_ids must be on the model's device cpu", "meta")),
    Case("forward-mask-float", lambda e: e.dec(e.seg, attention_mask=torch.ones(2, SEG)), TypeError,
         ("attention_mask must be bool or integer", "torch.float32")),
    Case("forward-mask-shape", lambda e: e.dec(e.seg, attention_mask=e.seg[:, :3] > 0), ValueError,
         ("attention_mask must have shape [2, 4]", "got [2, 3]")),
    Case("forward-memory-batch", lambda e: e.dec(e.seg, memory=e.memory[:1]), ValueError,
         ("memory must have shape [2, 3, 16]", "got [1, 3, 16]")),
    Case("forward-memory-slots", lambda e: e.dec(e.seg, memory=e.memory[:, :2]), ValueError,
         ("memory must have shape [2, 3, 16]", "got [2, 2, 16]")),
    Case("forward-memory-width", lambda e: e.dec(e.seg, memory=e.memory[..., :8]), ValueError,
         ("memory must have shape [2, 3, 16]", "got [2, 3, 8]")),
    Case("forward-memory-dtype", lambda e: e.dec(e.seg, memory=e.memory.double()), TypeError,
         ("memory must have dtype memory_dtype=torch.float32", "torch.float64")),
    Case("forward-memory-int", lambda e: e.dec(e.seg, memory=e.memory.int()), TypeError,
         ("memory must have dtype memory_dtype=torch.float32", "torch.int32")),
    Case("forward-memory-device", lambda e: e.dec(e.seg, memory=e.memory.to(META)), ValueError,
         ("memory must be on the model's device cpu", "meta")),
    Case("forward-memory-not-tensor", lambda e: e.dec(e.seg, memory=e.memory.tolist()), TypeError,
         ("memory must be a torch.Tensor or None", "list")),
    Case("forward-memory-nan", lambda e: e.dec(e.seg, memory=with_value(e.memory, NAN)),
         ValueError, ("memory must be finite", "NaN or infinity in batch row 1")),
    Case("forward-memory-inf", lambda e: e.encdec(e.seg, memory=with_value(e.memory, -INF)),
         ValueError, ("memory must be finite", "NaN or infinity in batch row 1")),
    Case("forward-labels-out-of-vocab", lambda e: e.dec(e.seg, labels=e.seg + VOCAB), ValueError,
         ("labels must be token ids in [0, 11) or -100", "got")),
    Case("forward-labels-float", lambda e: e.dec(e.seg, labels=e.seg.float()), TypeError,
         ("labels must hold integer token ids", "torch.float32")),
    Case("forward-labels-batch", lambda e: e.encdec(e.seg, labels=e.seg[:1]), ValueError,
         ("labels must have batch size 2", "got 1")),
    Case("forward-decoder-ids-too-long", lambda e: e.encdec(e.seg, decoder_input_ids=e.ids),
         ValueError, ("decoder_input_ids has 8 tokens", "segment_length=4")),
    Case("forward-all-padding-with-labels",
         lambda e: e.dec(e.seg, attention_mask=e.seg < 0, labels=e.seg), ValueError,
         ("labels: the segment has no token to predict", "padded by attention_mask")),
    Case("forward-encdec-labels-all-ignored", lambda e: e.encdec(e.seg, labels=e.seg * 0 - 100),
         ValueError, ("labels: the segment has no token to predict",)),
    Case("forward-decoder-ids-wrong-arch", lambda e: e.dec(e.seg, decoder_input_ids=e.seg),
         ValueError, ("decoder_input_ids is only used by the 'encoder-decoder'",)),
    # ---- Memformer.sequence_loss / init_memory / generate
    Case("sequence-labels-shape", lambda e: e.dec.sequence_loss(e.ids, labels=e.seg), ValueError,
         ("labels must have shape [2, 8]", "got [2, 4]")),
    Case("sequence-all-ignored", lambda e: e.dec.sequence_loss(e.ids, labels=e.ids * 0 - 100),
         ValueError, ("no token to predict",)),
    Case("sequence-encdec-one-segment", lambda e: e.encdec.sequence_loss(e.seg), ValueError,
         ("no token to predict", "needs two segments")),
    Case("sequence-memory-shape", lambda e: e.dec.sequence_loss(e.ids, memory=e.memory[:1]),
         ValueError, ("memory must have shape [2, 3, 16]", "got [1, 3, 16]")),
    Case("sequence-memory-nan",
         lambda e: e.dec.sequence_loss(e.ids, memory=with_value(e.memory, NAN)), ValueError,
         ("memory must be finite", "NaN or infinity in batch row 1")),
    Case("sequence-empty-batch", lambda e: e.encdec.sequence_loss(e.ids[:0]), ValueError,
         ("input_ids must have shape [B, L] with B, L >= 1", "got [0, 8]")),
    Case("sequence-mask-float", lambda e: e.dec.sequence_loss(e.ids, attention_mask=e.ids * 1.0),
         TypeError, ("attention_mask must be bool or integer", "torch.float32")),
    Case("init-memory-zero", lambda e: e.dec.init_memory(0), ValueError,
         ("batch_size must be a positive int", "got 0")),
    Case("init-memory-float", lambda e: e.dec.init_memory(2.0), ValueError,
         ("batch_size must be a positive int", "got 2.0")),
    Case("init-memory-bool", lambda e: e.dec.init_memory(True), ValueError,
         ("batch_size must be a positive int", "got True")),
    Case("generate-negative-tokens", lambda e: e.dec.generate(e.seg, -1), ValueError,
         ("max_new_tokens must be an int >= 0", "got -1")),
    Case("generate-temperature-negative", lambda e: e.dec.generate(e.seg, 2, temperature=-0.5),
         ValueError, ("temperature must be a finite number >= 0", "-0.5")),
    Case("generate-temperature-nan", lambda e: e.dec.generate(e.seg, 2, temperature=NAN),
         ValueError, ("temperature must be a finite number >= 0", "nan")),
    Case("generate-top-k-zero", lambda e: e.dec.generate(e.seg, 2, temperature=1.0, top_k=0),
         ValueError, ("top_k must be a positive int or None", "got 0")),
    Case("generate-top-k-bool", lambda e: e.dec.generate(e.seg, 2, temperature=1.0, top_k=True),
         ValueError, ("top_k must be a positive int or None", "got True")),
    Case("generate-prompt-out-of-vocab", lambda e: e.encdec.generate(e.ids + VOCAB, 2), ValueError,
         ("prompt_ids must hold ids in [0, vocab_size=11)", "got values in [")),
    Case("generate-empty-batch", lambda e: e.dec.generate(e.ids[:0], 2), ValueError,
         ("prompt_ids must have shape [B, L] with B, L >= 1", "got [0, 8]")),
    Case("generate-memory-dtype", lambda e: e.dec.generate(e.seg, 2, memory=e.memory.half()),
         TypeError, ("memory must have dtype memory_dtype=torch.float32", "torch.float16")),
    Case("generate-memory-inf",
         lambda e: e.dec.generate(e.seg, 2, memory=with_value(e.memory, INF)), ValueError,
         ("memory must be finite", "NaN or infinity in batch row 1")),
    # ---- state dicts of another configuration
    Case("state-dict-other-slots",
         lambda e: e.dec.load_state_dict(Memformer(make_config(n_memory_slots=5)).state_dict()),
         RuntimeError, ("writer.bias: expected shape [3, 16], got [5, 16]", "nothing was loaded")),
    Case("state-dict-other-width",
         lambda e: e.dec.load_state_dict(Memformer(make_config(d_model=8, n_heads=2)).state_dict()),
         RuntimeError, ("embed.weight: expected shape [11, 16], got [11, 8]",)),
    Case("state-dict-other-architecture",
         lambda e: e.dec.load_state_dict(e.encdec.state_dict()), RuntimeError,
         ("unexpected keys", "decoder.0")),
    Case("state-dict-other-vocab-non-strict",
         lambda e: e.dec.load_state_dict(Memformer(make_config(vocab_size=12)).state_dict(),
                                         strict=False), RuntimeError,
         ("embed.weight: expected shape [11, 16], got [12, 16]",)),
    # ---- mrbp.backward
    Case("mrbp-not-a-memformer", lambda e: mrbp.backward(torch.nn.Linear(2, 2), e.ids), TypeError,
         ("model must be a Memformer", "Linear")),
    Case("mrbp-memory-shape", lambda e: mrbp.backward(e.dec, e.ids, e.memory[:, :2]), ValueError,
         ("memory must have shape [2, 3, 16]", "got [2, 2, 16]")),
    Case("mrbp-memory-dtype", lambda e: mrbp.backward(e.dec, e.ids, e.memory.bfloat16()), TypeError,
         ("memory must have dtype memory_dtype=torch.float32", "torch.bfloat16")),
    Case("mrbp-ids-out-of-vocab", lambda e: mrbp.backward(e.encdec, e.ids * 0 + VOCAB), ValueError,
         ("input_ids must hold ids in [0, vocab_size=11)", f"[{VOCAB}, {VOCAB}]")),
    Case("mrbp-mask-float", lambda e: mrbp.backward(e.dec, e.ids, attention_mask=e.ids * 1.0),
         TypeError, ("attention_mask must be bool or integer", "torch.float32")),
    Case("mrbp-labels-device", lambda e: mrbp.backward(e.dec, e.ids, labels=e.ids.to(META)),
         ValueError, ("labels must be on cpu", "meta")),
    Case("mrbp-offload-not-bool", lambda e: mrbp.backward(e.dec, e.ids, offload="yes"), TypeError,
         ("offload must be a bool", "str 'yes'")),
    Case("mrbp-preserve-rng-not-bool", lambda e: mrbp.backward(e.dec, e.ids, preserve_rng=None),
         TypeError, ("preserve_rng must be a bool", "NoneType None")),
    Case("mrbp-empty-batch", lambda e: mrbp.backward(e.dec, e.ids[:0]), ValueError,
         ("input_ids must have shape [B, L] with B, L >= 1", "got [0, 8]")),
]  # fmt: skip
BUFFER_CASES = [
    Case("buffer-push-full", lambda e: e.full.push(e.memory, 1), IndexError, ("full", "capacity")),
    Case("buffer-push-shape", lambda e: e.buffer.push(e.memory[:1], 1), ValueError,
         ("shape", "1, 3, 16")),
    Case("buffer-push-dtype", lambda e: e.buffer.push(e.memory.double(), 1), TypeError,
         ("dtype", "Double")),
    Case("buffer-push-device", lambda e: e.buffer.push(e.memory.to(META), 1), ValueError,
         ("meta",)),
    Case("buffer-get-index", lambda e: e.buffer.get(1), IndexError, ("index", "1")),
    Case("buffer-get-negative", lambda e: e.buffer.get(-1), IndexError, ("index", "-1")),
    Case("buffer-pop-empty", lambda e: e.empty_buffer.pop(), IndexError, ("empty",)),
    Case("buffer-zero-capacity", lambda e: ReplayBuffer(0, (2, 3), torch.float32, "cpu"),
         ValueError, ("capacity", "0")),
    Case("buffer-offload-string", lambda e: ReplayBuffer(2, (2, 3), torch.float32, "cpu", "no"),
         TypeError, ("offload must be a bool", "str 'no'")),
    Case("buffer-capacity-bool", lambda e: ReplayBuffer(True, (2, 3), torch.float32, "cpu"),
         TypeError, ("capacity must be an int", "bool True")),
    Case("buffer-nbytes-where", lambda e: e.buffer.nbytes("gpu"), ValueError, ("where", "gpu")),
]  # fmt: skip
# ---- MemformerConfig: zero slots and other impossible configurations
CONFIG_CASES = [
    ("config-zero-slots", dict(n_memory_slots=0), "n_memory_slots must be a positive int, got 0"),
    ("config-zero-segment", dict(segment_length=0), "segment_length must be a positive int, got 0"),
    ("config-heads-divide-width", dict(n_heads=3), "d_model (16) must be divisible by n_heads (3)"),
    ("config-temperature-zero", dict(write_temperature=0.0), "write_temperature must be > 0"),
    (
        "config-temperature-nan",
        dict(write_temperature=NAN),
        "write_temperature must be > 0, got nan",
    ),
    ("config-memory-dtype-int", dict(memory_dtype=torch.int32), "memory_dtype must be a floating"),
    ("config-backend-unknown", dict(backend="cuda"), "backend must be one of"),
    ("config-dropout-one", dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_and_changes_nothing(env: SimpleNamespace, case: Case) -> None:
    check_case(env, case)


@pytest.mark.parametrize("case", BUFFER_CASES, ids=[c.id for c in BUFFER_CASES])
def test_bad_replay_buffer_use_raises_and_changes_nothing(
    buffer_env: SimpleNamespace, case: Case
) -> None:
    check_case(buffer_env, case)


@pytest.mark.parametrize(
    ("overrides", "says"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config_raises(overrides: dict, says: str) -> None:
    with pytest.raises(ValueError) as info:
        make_config(**overrides)
    assert says in str(info.value)


def test_docs_table_lists_every_case() -> None:
    """docs/robustness.md names every case tested here, and no case that is not."""
    text = DOCS.read_text()
    ids = [c.id for c in CASES + BUFFER_CASES] + [c[0] for c in CONFIG_CASES]
    missing = [i for i in ids if f"`{i}`" not in text]
    assert not missing, f"cases missing from {DOCS.name}: {missing}"


# ------------------------------------------------------------------ NaN and infinity in data
# Not argument errors: the ops propagate them (no host sync to look), and mrbp.backward, which
# must not corrupt gradients, raises FloatingPointError naming the segment. A memory given to
# forward, sequence_loss or generate is checked (read with the ids): a NaN in it would poison
# every later segment of its row.


@pytest.mark.parametrize("bad", [NAN, INF])
def test_nan_inf_in_op_inputs_propagate_locally(bad: float) -> None:
    """A non-finite input poisons exactly the outputs that depend on it, nothing else."""
    torch.manual_seed(1)
    q, k, v = torch.randn(B, L, H, DH), torch.randn(B, S, H, DH), torch.randn(B, S, H, DH)
    q[0, 1, 0, 2] = bad
    o = functional.memory_read_attention(q, k, v)
    assert not torch.isfinite(o[0, 1, 0]).any()
    finite = torch.ones(B, L, H, dtype=torch.bool)
    finite[0, 1, 0] = False
    assert torch.isfinite(o[finite]).all()

    qs, ks, vs = torch.randn(B, S, H, DH), torch.randn(B, S, H, DH), torch.randn(B, S, H, DH)
    kt, vt = torch.randn(B, L, H, DH), torch.randn(B, L, H, DH)
    vt[1, 2, 1, 0] = bad  # a real token of batch row 1, head 1: every slot of that head reads it
    o = functional.memory_write_attention(qs, ks, vs, kt, vt)
    assert not torch.isfinite(o[1, :, 1]).all(dim=-1).any()
    assert torch.isfinite(o[0]).all() and torch.isfinite(o[1, :, 0]).all()

    m, c, g = torch.randn(B, S, WIDTH), torch.randn(B, S, WIDTH), torch.randn(B, S, WIDTH)
    c[1, 2, 5] = bad
    new = functional.gated_memory_update(m, c, torch.randn(S, WIDTH), g)
    assert not torch.isfinite(new[1, 2]).all()
    finite = torch.ones(B, S, dtype=torch.bool)
    finite[1, 2] = False
    assert torch.isfinite(new[finite]).all()


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_non_finite_memory_is_refused_by_forward_sequence_loss_and_generate(arch: str) -> None:
    """NaN or inf in the memory passed to ``forward``, ``sequence_loss`` or ``generate`` would
    give NaN logits and loss (and ``generate`` token 0): refused with a ValueError naming the row,
    the caller's memory untouched; a finite memory still works."""
    torch.manual_seed(2)
    model = Memformer(make_config(arch))
    ids = torch.randint(0, VOCAB, (2, 2 * SEG))
    for bad in (NAN, INF, -INF):
        memory = with_value(model.init_memory(2).detach(), bad)
        kept = memory.clone()
        calls = {
            "forward": lambda m: model(ids[:, :SEG], memory=m, labels=ids[:, :SEG]),
            "sequence_loss": lambda m: model.sequence_loss(ids, memory=m),
            "generate": lambda m: model.generate(ids[:, :3], 2, memory=m),
        }
        for name, call in calls.items():
            with pytest.raises(ValueError, match="memory must be finite, got NaN or infinity in "
                               "batch row 1"):  # fmt: skip
                call(memory)
            assert torch.equal(memory.isnan(), kept.isnan()), name
            assert torch.equal(memory.nan_to_num(), kept.nan_to_num()), name
        memory[1] = kept[0]
        for call in calls.values():
            call(memory)  # finite: accepted


def _grads_and_params(model: Memformer) -> dict[str, torch.Tensor | None]:
    state: dict[str, torch.Tensor | None] = {}
    for name, p in model.named_parameters():
        state[name] = p.detach().clone()
        state[name + ".grad"] = None if p.grad is None else p.grad.clone()
    return state


def _assert_state(model: Memformer, before: dict[str, torch.Tensor | None]) -> None:
    for name, value in _grads_and_params(model).items():
        assert_same(before[name], value, name)


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_mrbp_non_finite_memory_raises_and_keeps_gradients(arch: str, bad: float) -> None:
    torch.manual_seed(3)
    model = Memformer(make_config(arch))
    ids = torch.randint(0, VOCAB, (2, 3 * SEG))
    model.sequence_loss(ids)[0].backward()
    memory = model.init_memory(2).detach().clone()
    memory[0, 1, 2] = bad
    memory.requires_grad_()
    memory.grad = torch.full_like(memory, 0.25)
    kept, before = memory.detach().clone(), _grads_and_params(model)
    with pytest.raises(FloatingPointError, match="segment 0 is not finite"):
        mrbp.backward(model, ids, memory)
    _assert_state(model, before)
    assert torch.equal(memory.detach().isnan(), kept.isnan())
    assert memory.grad is not None and bool((memory.grad == 0.25).all())


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_mrbp_non_finite_loss_names_the_segment_and_keeps_every_grad(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loss that turns NaN in segment 1 of 3: the error names it; no .grad moved, including the
    gradient of a carried memory that requires grad."""
    torch.manual_seed(4)
    model = Memformer(make_config(arch))
    ids = torch.randint(0, VOCAB, (2, 3 * SEG))
    model.sequence_loss(ids)[0].backward()
    real_step = model.rollout_step

    def step(rollout, t, memory, seed=None, with_loss=True):
        loss, new = real_step(rollout, t, memory, seed, with_loss)
        return (loss * NAN if loss is not None and t == 1 else loss), new

    monkeypatch.setattr(model, "rollout_step", step)
    memory = model.init_memory(2).detach().clone().requires_grad_()
    memory.grad = torch.full_like(memory, 0.5)
    before = _grads_and_params(model)
    with pytest.raises(FloatingPointError, match="segment 1 is not finite"):
        mrbp.backward(model, ids, memory)
    _assert_state(model, before)
    assert memory.grad is not None and bool((memory.grad == 0.5).all())


def test_mrbp_exception_mid_replay_keeps_every_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception during the replay (here on segment 0, after two segments' backward calls)
    leaves every gradient as it was."""
    torch.manual_seed(5)
    model = Memformer(make_config("decoder"))
    ids = torch.randint(0, VOCAB, (2, 3 * SEG))
    model.sequence_loss(ids)[0].backward()
    real_step, calls = model.rollout_step, []

    def step(rollout, t, memory, seed=None, with_loss=True):
        calls.append((t, with_loss))
        if with_loss and t == 0:
            raise KeyboardInterrupt  # the harshest: not even an Exception
        return real_step(rollout, t, memory, seed, with_loss)

    monkeypatch.setattr(model, "rollout_step", step)
    memory = model.init_memory(2).detach().clone().requires_grad_()
    before = _grads_and_params(model)
    with pytest.raises(KeyboardInterrupt):
        mrbp.backward(model, ids, memory)
    assert (2, True) in calls and (1, True) in calls
    _assert_state(model, before)
    assert memory.grad is None


def test_docs_list_every_robustness_case() -> None:
    """docs/robustness.md names every test of training runs, checkpoints, the CLI's flags,
    dropout randomness and the stated semantics, and every case of their tables."""
    import ast

    import test_cli
    import test_train_robustness

    text = DOCS.read_text()
    tests = pathlib.Path(__file__).resolve().parent
    listed = {  # file: the prefix of its tests that the document lists
        "test_train_robustness.py": "test_",
        "test_randomness.py": "test_",
        "test_mrbp.py": "test_mrbp_refuses_",  # the semantics refused
        "test_functional.py": "test_double_backward_",  # the semantics stated
    }
    names = [
        node.name
        for file, prefix in listed.items()
        for node in ast.parse((tests / file).read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith(prefix)
    ]
    names += [name for name in dir(test_cli) if name.startswith("test_generate_")]
    names += [case[0] for case in test_cli.BAD_FLAGS] + list(test_train_robustness.HAND_EDITS)
    missing = [name for name in names if f"`{name}" not in text]
    assert not missing, f"missing from {DOCS.name}: {missing}"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_labels_take_every_dtype_input_ids_take(dtype: torch.dtype) -> None:
    """``labels`` take every dtype ``input_ids`` take (uint8 and int16 too), with the same
    losses and gradients as int64; bool is refused for both."""
    torch.manual_seed(3)
    model = Memformer(make_config("decoder"))
    ids = torch.randint(0, VOCAB, (2, 2 * SEG))
    expected = model.sequence_loss(ids, labels=ids)[0]
    assert torch.equal(model.sequence_loss(ids.to(dtype), labels=ids.to(dtype))[0], expected)
    seg = ids[:, :SEG]
    out = model(seg.to(dtype), labels=seg.to(dtype)).loss
    assert out is not None and torch.equal(out, model(seg, labels=seg).loss)
    reference = mrbp.backward(model, ids, labels=ids).loss
    model.zero_grad(set_to_none=True)
    assert torch.equal(mrbp.backward(model, ids.to(dtype), labels=ids.to(dtype)).loss, reference)
    for name, call in (("labels", lambda: model(seg, labels=seg.bool())),
                       ("input_ids", lambda: model(seg.bool()))):  # fmt: skip
        with pytest.raises(TypeError, match=f"{name} must hold integer token ids"):
            call()
