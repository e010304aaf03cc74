"""Model configuration."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURES = ("encoder-decoder", "decoder")
BACKENDS = ("auto", "reference", "triton")


def dtype_name(value: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how a dtype field is written to JSON or a checkpoint)."""
    return str(value).removeprefix("torch.")


def parse_dtype(name: str, value: object) -> torch.dtype:
    """The dtype field ``name`` from a ``torch.dtype`` or its name (``"float32"``)."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"{name} must be a torch.dtype or its name, got {value!r}")


@dataclass
class MemformerConfig:
    """Hyper-parameters of a :class:`~memformer_fast.Memformer`.

    The sizes default to the paper's WikiText-103 model. The initialisation fields decide whether
    the memory can learn at all, and their defaults are measured (docs/memory_learning.md):

    - ``embedding_init_std=1.0``: token identity dominates the residual stream at init. With
      GPT-style 0.02 embeddings the writer sees each token blurred with its neighbours and the
      memory, and single-key recall stays at chance.
    - ``init_std=None``: linear layers keep PyTorch's fan-in scaled initialisation, so their scale
      follows the width (a float gives GPT-style ``normal(0, init_std)`` weights).
    - ``tie_embeddings=False``: an output layer of its own; tied to unit-variance embeddings the
      initial logits would have a standard deviation of ``sqrt(d_model)``.
    - ``bias_init_norm=0.001``: a large memory bias wipes the slots at every segment, and a
      moderate one lets the memory drift, tens of segments in, into a state the readout never
      saw in training; from a tiny bias the memory's dynamics are stationary from the first
      segment, so recall holds far beyond the trained length (docs/memory_learning.md).
    - ``gate_bias_init=0.0``: the gate starts half open. A closed-leaning gate learns as fast but
      carries recall less far beyond the trained length.
    - ``memory_noise=0.0``: in training, every slot written gets Gaussian noise whose norm is
      about ``memory_noise`` (``memory_noise / sqrt(d_model)`` per element) and is renormalised.
      A memory that only copies a slot forward drifts under the noise and fails within the
      rollout, so training prefers memories whose slots settle into a state set by what they
      hold, and those carry recall far beyond the trained length (docs/memory_learning.md).
      Drawn like dropout's masks: MRBP's gradients stay exact. No noise in eval mode.
    - ``write_rotary=False``: the writer's token keys carry no position. With True they are
      rotated (rotary embedding) by their position relative to the segment's end, as if the slots
      stood right after the last token: a slot can then attend by recency, e.g. hold the last
      bytes for the next segment's first tokens (benchmarks/real_text.py). No parameters added.
    """

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 4
    n_decoder_layers: int = 8
    n_memory_slots: int = 32
    segment_length: int = 64
    write_temperature: float = 0.5
    memory_gate: bool = True
    dropout: float = 0.0
    architecture: str = "encoder-decoder"
    backend: str = "auto"
    memory_dtype: torch.dtype = torch.float32
    bos_token_id: int = 0
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    bias_init_norm: float = 0.001
    gate_bias_init: float = 0.0
    tie_embeddings: bool = False
    init_std: float | None = None
    embedding_init_std: float = 1.0
    memory_noise: float = 0.0
    write_rotary: bool = False

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_heads", "d_ff", "n_memory_slots", "segment_length")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MemformerConfig.{name} must be a positive int, got {value!r}")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MemformerConfig.{name} must be an int >= 0, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"MemformerConfig.d_model ({self.d_model}) must be divisible by "
                f"n_heads ({self.n_heads})"
            )
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"MemformerConfig.architecture must be one of {ARCHITECTURES}, "
                f"got {self.architecture!r}"
            )
        if self.architecture == "encoder-decoder" and self.n_encoder_layers < 1:
            raise ValueError("MemformerConfig.n_encoder_layers must be >= 1 for 'encoder-decoder'")
        if self.n_decoder_layers < 1:
            raise ValueError(
                f"MemformerConfig.n_decoder_layers must be >= 1, got {self.n_decoder_layers}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"MemformerConfig.backend must be one of {BACKENDS}, got {self.backend!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MemformerConfig.dropout must be in [0, 1), got {self.dropout!r}")
        noise = self.memory_noise
        number = isinstance(noise, (int, float)) and not isinstance(noise, bool)
        if not (number and math.isfinite(noise) and noise >= 0):
            raise ValueError(
                f"MemformerConfig.memory_noise must be a finite number >= 0, got {noise!r}"
            )
        for name in ("memory_gate", "tie_embeddings", "write_rotary"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"MemformerConfig.{name} must be a bool, got {getattr(self, name)!r}"
                )
        if not self.write_temperature > 0:
            raise ValueError(
                f"MemformerConfig.write_temperature must be > 0, got {self.write_temperature!r}"
            )
        if not (isinstance(self.memory_dtype, torch.dtype) and self.memory_dtype.is_floating_point):
            raise ValueError(
                "MemformerConfig.memory_dtype must be a floating torch.dtype, "
                f"got {self.memory_dtype!r}"
            )
        if not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(
                f"MemformerConfig.bos_token_id must be in [0, vocab_size={self.vocab_size}), "
                f"got {self.bos_token_id}"
            )
        if self.init_std is not None and not (
            isinstance(self.init_std, (int, float)) and self.init_std > 0
        ):
            raise ValueError(
                "MemformerConfig.init_std must be None (fan-in scaled) or > 0, "
                f"got {self.init_std!r}"
            )
        for name in ("rope_base", "layer_norm_eps", "bias_init_norm", "embedding_init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MemformerConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def stochastic(self) -> bool:
        """Whether training draws random numbers (dropout masks, memory noise)."""
        return self.dropout > 0 or self.memory_noise > 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (JSON, checkpoints): dtypes become their names."""
        d = dataclasses.asdict(self)
        for name in DTYPE_FIELDS:
            d[name] = dtype_name(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemformerConfig:
        """The config :meth:`to_dict` wrote (dtypes as names or ``torch.dtype``\\ s). A field
        missing from ``d`` takes its default, so a dict saved before that field existed loads;
        an unknown key is a ValueError naming it."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict of MemformerConfig fields, got {type(d).__name__}")
        unknown = sorted(set(d) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"d has keys that are not MemformerConfig fields: {unknown}")
        values = dict(d)
        for name in DTYPE_FIELDS & set(values):
            values[name] = parse_dtype(f"MemformerConfig.{name}", values[name])
        return cls(**values)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(MemformerConfig))
# The fields whose default is a torch.dtype: written as the dtype's name.
DTYPE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(MemformerConfig) if isinstance(f.default, torch.dtype)
)
