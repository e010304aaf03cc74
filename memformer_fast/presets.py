"""Named model sizes, as :class:`~memformer_fast.MemformerConfig` fields: the one place each is
written. The command line, the benchmarks and the tests take their models from here.

- ``"paper"``: the paper's WikiText-103 encoder-decoder (a 32k BPE vocabulary, not the paper's
  267k word vocabulary with adaptive softmax); ``"paper-decoder12"``: the paper's Table 3 model
  (the v1 "Memformer Decoder"); ``"cpu-small"`` and ``"cpu-decoder4"``: scaled-down versions that
  run in seconds on two cores. These four keep ``d_ff = 4 * d_model``, as the peer fixes it.
- ``"byte-lm"``: the model of a new ``memformer-fast train`` run (no ``vocab_size``: the byte
  vocabulary is the application's; ``d_ff`` defaults to ``4 * d_model`` there).
- ``"recall-small"`` (0.16M parameters) and ``"recall-large"`` (1.1M): the demo's recall models
  (the task fixes the vocabulary and the architecture), trained with the memory noise that
  carries recall far beyond the trained length (docs/memory_learning.md, "How far the memory
  carries").
- ``"tiny"``: two heads of width 8, two layers each side, reference backend: builds in moments.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        architecture="encoder-decoder",
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        d_ff=2048,
        n_encoder_layers=4,
        n_decoder_layers=8,
        n_memory_slots=32,
        segment_length=64,
    ),
    "paper-decoder12": dict(
        architecture="decoder",
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        d_ff=2048,
        n_decoder_layers=12,
        n_memory_slots=32,
        segment_length=64,
    ),
    "cpu-small": dict(
        architecture="encoder-decoder",
        vocab_size=1024,
        d_model=128,
        n_heads=4,
        d_ff=512,
        n_encoder_layers=2,
        n_decoder_layers=4,
        n_memory_slots=16,
        segment_length=32,
    ),
    "cpu-decoder4": dict(
        architecture="decoder",
        vocab_size=1024,
        d_model=128,
        n_heads=4,
        d_ff=512,
        n_decoder_layers=4,
        n_memory_slots=16,
        segment_length=32,
    ),
    "byte-lm": dict(
        architecture="decoder",
        d_model=128,
        n_heads=4,
        n_decoder_layers=4,
        n_encoder_layers=4,
        n_memory_slots=16,
        segment_length=64,
        dropout=0.0,
        backend="auto",
    ),
    "recall-small": dict(
        d_model=64,
        n_heads=4,
        d_ff=256,
        n_decoder_layers=2,
        n_memory_slots=8,
        segment_length=16,
        memory_noise=0.8,
    ),
    "recall-large": dict(
        d_model=128,
        n_heads=4,
        d_ff=512,
        n_decoder_layers=4,
        n_memory_slots=16,
        segment_length=32,
        memory_noise=0.8,
    ),
    "tiny": dict(
        vocab_size=23,
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_encoder_layers=2,
        n_decoder_layers=2,
        n_memory_slots=3,
        segment_length=5,
        backend="reference",
    ),
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A fresh copy of the fields of preset ``name``, with ``overrides`` replacing or adding
    fields (pass the result to ``MemformerConfig(**fields)``)."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    return {**PRESETS[name], **overrides}
