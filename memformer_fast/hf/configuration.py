"""``MemformerHFConfig``: a ``transformers`` configuration holding every ``MemformerConfig`` field.

The field list, the defaults and the validation all come from :class:`MemformerConfig` itself
(``dataclasses.fields``), so a field added there appears here without another edit. ``torch.dtype``
fields are kept as their names (``"float32"``) so that ``config.json`` stays plain JSON.

A saved folder follows ``transformers``' convention for models it does not ship: ``config.json``
holds an ``auto_map`` naming :data:`REMOTE_CODE_FILE`, written beside it, a few lines that import
the installed ``memformer_fast``. So ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` loads it in a process that never imported this package (plain
``from_pretrained`` works after ``import memformer_fast.hf``, which registers the model type).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

from transformers import PretrainedConfig

from ..config import DTYPE_FIELDS, MemformerConfig, dtype_name, parse_dtype

MODEL_TYPE = "memformer"
# vocab_size is the one MemformerConfig field without a default; the HF config needs one for
# ``MemformerHFConfig()`` (the byte vocabulary of ``memformer-fast train``).
DEFAULT_VOCAB_SIZE = 256
FIELDS = {f.name: f for f in dataclasses.fields(MemformerConfig)}

# The module a saved folder carries for trust_remote_code: transformers copies it into its module
# cache and imports it, which imports the installed package (so the code that runs is the
# package's, never a copy that could drift from it).
REMOTE_CODE_FILE = "modeling_memformer.py"
REMOTE_CODE = '''"""Loads this Memformer folder with the installed memformer_fast package.

transformers imports this file for AutoConfig / AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True) (the folder's config.json names it in auto_map). It needs
memformer_fast with its Hugging Face extra: pip install "memformer_fast[hf]".
"""

from memformer_fast.hf import MemformerForCausalLM, MemformerHFConfig

__all__ = ["MemformerForCausalLM", "MemformerHFConfig"]
'''
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.MemformerHFConfig",
    "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.MemformerForCausalLM",
}


class MemformerHFConfig(PretrainedConfig):
    """Every :class:`~memformer_fast.MemformerConfig` field as a ``transformers`` config attribute.

    ``MemformerHFConfig(**fields)`` takes the ``MemformerConfig`` fields (same names, same
    defaults; ``vocab_size`` defaults to 256, the byte vocabulary) plus the usual
    ``PretrainedConfig`` keywords, and validates them with ``MemformerConfig``'s own checks.
    ``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers`` and
    ``tie_word_embeddings`` are aliases of ``d_model``, ``n_heads``, ``d_ff``,
    ``n_decoder_layers`` and ``tie_embeddings``. Both architectures are causal LMs to
    ``transformers`` (``is_encoder_decoder`` stays False): the encoder-decoder reads segment
    ``t`` and predicts segment ``t + 1`` of the same token stream.
    """

    model_type = MODEL_TYPE
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "num_hidden_layers": "n_decoder_layers",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"MemformerHFConfig needs a config of model_type {MODEL_TYPE!r}, got "
                f"model_type {model_type!r} (a checkpoint of another model?)"
            )
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                if name in kwargs and kwargs[name] != kwargs[alias]:
                    raise ValueError(
                        f"MemformerHFConfig got {alias}={kwargs[alias]!r} and {name}="
                        f"{kwargs[name]!r}: they are the same field"
                    )
                kwargs[name] = kwargs.pop(alias)
        values: dict[str, Any] = {}
        for name, f in FIELDS.items():
            if name in kwargs:
                values[name] = kwargs.pop(name)
            elif f.default is not dataclasses.MISSING:
                values[name] = f.default
            else:
                values[name] = DEFAULT_VOCAB_SIZE if name == "vocab_size" else None
        for name in DTYPE_FIELDS:
            values[name] = parse_dtype(f"MemformerHFConfig.{name}", values[name])
        MemformerConfig(**values)  # its validation: a bad field raises a ValueError naming it
        for name, value in values.items():
            setattr(self, name, dtype_name(value) if name in DTYPE_FIELDS else value)
        super().__init__(**kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
    ) -> None:
        """``PretrainedConfig.save_pretrained``, plus :data:`REMOTE_CODE_FILE` and the
        ``auto_map`` naming it (``PreTrainedModel.save_pretrained`` calls this too), so that the
        folder loads with ``trust_remote_code=True`` and nothing imported beforehand. The module
        is written first: with ``push_to_hub`` it is uploaded with the config."""
        os.makedirs(save_directory, exist_ok=True)
        (Path(save_directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub, **kwargs)

    def to_memformer_config(self) -> MemformerConfig:
        """The :class:`MemformerConfig` these attributes describe (validated again: attributes can
        be edited after construction)."""
        values = {name: getattr(self, name) for name in FIELDS}
        for name in DTYPE_FIELDS:
            values[name] = parse_dtype(f"MemformerHFConfig.{name}", values[name])
        return MemformerConfig(**values)

    @classmethod
    def from_memformer_config(cls, config: MemformerConfig, **kwargs: Any) -> MemformerHFConfig:
        """The HF config of a :class:`MemformerConfig` (``kwargs``: ``PretrainedConfig`` extras)."""
        if not isinstance(config, MemformerConfig):
            raise TypeError(f"config must be a MemformerConfig, got {type(config).__name__}")
        return cls(**{f: getattr(config, f) for f in FIELDS}, **kwargs)
