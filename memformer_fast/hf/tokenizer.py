"""The byte-level tokenizer as a ``transformers`` tokenizer (``memformer-fast export`` saves it).

``memformer-fast train`` models read raw bytes: token ``i`` is the byte ``i`` (256 tokens; id 0,
the NUL byte, doubles as the encoder-decoder's BOS and never occurs in text). :func:`byte_tokenizer`
builds that vocabulary with the ``tokenizers`` library, offline: a byte-level BPE with no merges,
so ``AutoTokenizer.from_pretrained(DIR)`` loads it from ``tokenizer.json`` without a download and
``tokenizer(text).input_ids == list(text.encode())``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def _byte_chars() -> dict[int, str]:
    """The printable character byte-level BPE uses for each byte (GPT-2's table): printable
    Latin-1 bytes stand for themselves, the others for code points from 256 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for byte in range(256):
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
