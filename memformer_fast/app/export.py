"""``memformer-fast export``: a ``memformer-fast train`` checkpoint as a Hugging Face folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..hf import MemformerForCausalLM, byte_tokenizer
from .checkpoint import load_model
from .data import VOCAB_SIZE
from .disk import check_output_dir, os_reason
from .errors import UserError, first_line
from .signals import signals_deferred


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a ``memformer-fast train`` checkpoint as a Hugging Face model folder.

    ``out_dir`` receives ``config.json`` (with an ``auto_map``), ``modeling_memformer.py`` (a
    module that imports the installed package), ``model.safetensors`` (tied weights stored once)
    with its checksum, ``generation_config.json`` and the byte tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``): ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it, offline,
    with ``trust_remote_code=True`` in any process, or without once ``memformer_fast.hf`` is
    imported.

    The folder is written under a hidden temporary name beside it and renamed into place once
    complete: a full disk, a read-only disk or Ctrl-C leaves nothing behind (no partial folder
    that looks finished, or blocks the rerun).

    Raises :class:`UserError` for a missing or invalid checkpoint, a non-empty ``out_dir``, or a
    folder that cannot be written (checked before the checkpoint is read).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: choose another output folder")
    check_output_dir(out, flag="output folder")
    model = load_model(checkpoint, "cpu")
    if model.config.vocab_size != VOCAB_SIZE:
        raise UserError(
            f"{checkpoint}: vocab_size {model.config.vocab_size} is not the byte vocabulary "
            f"({VOCAB_SIZE})"
        )
    partial = out.absolute().parent / f".{out.name}.partial-{os.getpid()}"
    try:
        partial.mkdir(parents=True)
        MemformerForCausalLM.from_memformer(model).save_pretrained(partial)
        byte_tokenizer().save_pretrained(partial)
        with signals_deferred():
            os.replace(partial, out)  # out is absent or an empty folder
    except OSError as error:
        raise UserError(
            f"could not write {out}: {os_reason(error, 'output folder')}; nothing was written"
        ) from None
    except Exception as error:  # safetensors' own errors (a full disk, ...)
        raise UserError(
            f"could not write {out}: {first_line(error)}; nothing was written"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out
