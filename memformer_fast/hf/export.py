"""The byte-level tokenizer as a ``transformers`` tokenizer, and ``memformer-fast export``.

``memformer-fast train`` models read raw bytes: token ``i`` is the byte ``i`` (256 tokens; id 0,
the NUL byte, doubles as the encoder-decoder's BOS and never occurs in text). :func:`byte_tokenizer`
builds that vocabulary with the ``tokenizers`` library, offline: a byte-level BPE with no merges,
so ``AutoTokenizer.from_pretrained(DIR)`` loads it from ``tokenizer.json`` without a download and
``tokenizer(text).input_ids == list(text.encode())``.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..training import VOCAB_SIZE, UserError, load_model
from .modeling import MemformerForCausalLM


def _byte_chars() -> dict[int, str]:
    """The printable character byte-level BPE uses for each byte (GPT-2's table): printable
    Latin-1 bytes stand for themselves, the others for code points from 256 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for byte in range(VOCAB_SIZE):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A ``transformers`` fast tokenizer whose token ids are the UTF-8 bytes of the text.

    No special tokens are declared (a special token would capture its character in the text);
    decoding turns ids back into bytes and bytes into text (invalid UTF-8 becomes U+FFFD).
    """
    vocab = {char: byte for byte, char in _byte_chars().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=int(1e30))


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
