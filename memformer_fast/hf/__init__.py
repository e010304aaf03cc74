"""Hugging Face ``transformers`` integration (``pip install "memformer_fast[hf]"``).

- :class:`MemformerHFConfig`: a ``PretrainedConfig`` holding every ``MemformerConfig`` field;
- :class:`MemformerForCausalLM`: the package's ``Memformer`` (either architecture) as a
  ``PreTrainedModel`` with ``generate()``, ``save_pretrained`` / ``from_pretrained``;
- :class:`MemformerCache`: the memory and the key/value caches of the segment being written;
- :class:`MRBPTrainer`: a ``Trainer`` whose training step is ``mrbp.backward``;
- :func:`byte_tokenizer`, :func:`export_checkpoint`: the byte-level tokenizer and the conversion
  of a ``memformer-fast train`` checkpoint (``memformer-fast export``).

Importing this module registers the ``"memformer"`` model type with ``AutoConfig`` and
``AutoModelForCausalLM``. The rest of the package never imports it.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'memformer_fast.hf needs transformers: pip install "memformer_fast[hf]"'
    ) from error

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import MemformerCache
from .configuration import MODEL_TYPE, MemformerHFConfig
from .export import byte_tokenizer, export_checkpoint
from .modeling import MemformerForCausalLM, MemformerPreTrainedModel
from .trainer import MRBPTrainer, stream_rollouts

AutoConfig.register(MODEL_TYPE, MemformerHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MemformerHFConfig, MemformerForCausalLM, exist_ok=True)

__all__ = [
    "MODEL_TYPE",
    "MRBPTrainer",
    "MemformerCache",
    "MemformerForCausalLM",
    "MemformerHFConfig",
    "MemformerPreTrainedModel",
    "byte_tokenizer",
    "export_checkpoint",
    "stream_rollouts",
]
