"""Hugging Face ``transformers`` integration (``pip install "memformer_fast[hf]"``).

- :class:`MemformerHFConfig`: a ``PretrainedConfig`` holding every ``MemformerConfig`` field;
- :class:`MemformerForCausalLM`: the package's ``Memformer`` (either architecture) as a
  ``PreTrainedModel`` with ``generate()``, ``save_pretrained`` / ``from_pretrained``;
- :class:`MemformerCache`: the memory and the key/value caches of the segment being written;
- :class:`MRBPTrainer`: a ``Trainer`` whose training step is ``mrbp.backward``;
- :func:`byte_tokenizer`: the byte-level tokenizer of ``memformer-fast train`` models (the
  conversion of a checkpoint, ``memformer-fast export``, is the application's:
  :mod:`memformer_fast.app.export`).

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
from .modeling import MemformerForCausalLM, MemformerPreTrainedModel
from .tokenizer import byte_tokenizer
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
    "stream_rollouts",
]
