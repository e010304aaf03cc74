"""``memformer-fast export``: a ``memformer-fast train`` checkpoint as a Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..hf import MemformerForCausalLM, byte_tokenizer
from .data import VOCAB_SIZE
from .errors import UserError
from .training import load_model


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a ``memformer-fast train`` checkpoint as a Hugging Face model folder.

    ``out_dir`` receives ``config.json``, ``model.safetensors`` (tied weights stored once),
    ``generation_config.json`` and the byte tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``): ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it, offline,
    once ``memformer_fast.hf`` is imported. Raises :class:`UserError` for a missing or invalid
    checkpoint, or a non-empty ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: choose another output folder")
    model = load_model(checkpoint, "cpu")
    if model.config.vocab_size != VOCAB_SIZE:
        raise UserError(
            f"{checkpoint}: vocab_size {model.config.vocab_size} is not the byte vocabulary "
            f"({VOCAB_SIZE})"
        )
    out.mkdir(parents=True, exist_ok=True)
    MemformerForCausalLM.from_memformer(model).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out
