"""Byte-level data for the language model: corpus files, documents aligned to segments, the
train/held-out split and the streams rollouts are read from.

The corpus (a file, or every text file under a folder) is one byte stream. The last part is held
out; the rest is cut into ``batch_size`` contiguous streams that are read ``segments * L`` bytes
at a time, so each rollout continues where the previous one stopped. With documents aligned to
segments (:func:`align_documents`) every file starts a segment and its last segment is padded.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..model import IGNORE_INDEX, Memformer
from .errors import UserError

VOCAB_SIZE = 256  # bytes; token 0 (NUL, absent from text) doubles as BOS


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def corpus_files(path: str | os.PathLike, pattern: str | None = None) -> Iterator[Path]:
    """The text files of ``path``, lazily: the file itself, or the files under a folder (sorted,
    hidden entries and ``__pycache__`` skipped, files with NUL bytes skipped as binary),
    optionally only those whose name matches the glob ``pattern``."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"no such file or folder: {root}")
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.startswith(".") or (pattern and not fnmatch.fnmatch(name, pattern)):
                continue
            file = Path(dirpath, name)
            with contextlib.suppress(OSError):
                if file.is_file() and not _looks_binary(file):
                    yield file


def load_documents(
    path: str | os.PathLike, pattern: str | None = None, max_bytes: int | None = None
) -> list[bytes]:
    """The bytes of each file of :func:`corpus_files`, in order, the first ``max_bytes`` in all
    (files after those are not even opened; the last one may be cut)."""
    documents, total = [], 0
    for file in corpus_files(path, pattern):
        try:
            data = file.read_bytes()
        except OSError as error:
            raise UserError(f"cannot read {file}: {error.strerror or error}") from None
        if max_bytes is not None:
            data = data[: max_bytes - total]
        documents.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not documents and Path(path).is_dir():
        what = f" matching {pattern!r}" if pattern else ""
        raise UserError(f"no text files{what} under {path}")
    if not total:
        raise UserError(f"{path} is empty: there is nothing to train on")
    return documents


def load_corpus(
    path: str | os.PathLike, pattern: str | None = None, max_bytes: int | None = None
) -> tuple[bytes, int]:
    """The bytes of :func:`load_documents` concatenated and the number of files they come
    from."""
    documents = load_documents(path, pattern, max_bytes)
    return b"".join(documents), len(documents)


PAD = -1  # the offset of a padding byte in an aligned layout


def align_documents(documents: list[bytes], segment_length: int) -> tuple[Tensor, Tensor]:
    """Lay documents end to end, each starting a segment: ``(tokens [N], offsets [N])`` with
    ``N`` a multiple of ``segment_length``. ``offsets`` is each byte's position in its document,
    :data:`PAD` for the padding (token 0) that fills each document's last segment; empty
    documents are dropped."""
    tokens, offsets = [], []
    for doc in documents:
        if not doc:
            continue
        n = len(doc)
        padded = -(-n // segment_length) * segment_length
        tokens.append(torch.frombuffer(bytearray(doc), dtype=torch.uint8).long())
        tokens.append(torch.zeros(padded - n, dtype=torch.long))
        offsets.append(torch.arange(n, dtype=torch.int32))
        offsets.append(torch.full((padded - n,), PAD, dtype=torch.int32))
    if not tokens:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.int32)
    return torch.cat(tokens), torch.cat(offsets)


@dataclass(frozen=True)
class ByteData:
    """A corpus split into a training and a held-out part, as token tensors.

    ``train_offsets``/``val_offsets`` (same length as the tokens) exist when the files are laid out
    one per segment start (:func:`align_documents`): each byte's position in its file, -1 for
    padding.
    """

    train: Tensor
    val: Tensor
    fingerprint: dict[str, int]
    train_offsets: Tensor | None = None
    val_offsets: Tensor | None = None

    @classmethod
    def from_bytes(cls, corpus: bytes, rollout_bytes: int, val_fraction: float) -> ByteData:
        """Hold out ``val_fraction`` of the bytes (at least one rollout's worth) at the end."""
        n_val = max(int(len(corpus) * val_fraction), rollout_bytes)
        _check_size(len(corpus), n_val + rollout_bytes)
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        return cls(
            train=tokens[:-n_val],
            val=tokens[-n_val:],
            fingerprint={"bytes": len(corpus), "crc32": zlib.crc32(corpus)},
        )

    @classmethod
    def from_documents(
        cls, documents: list[bytes], segment_length: int, rollout_bytes: int, val_fraction: float
    ) -> ByteData:
        """Files aligned to segment starts (:func:`align_documents`); the last files, about
        ``val_fraction`` of the bytes and at least one rollout, are held out (split at a file
        start when one leaves a rollout to train on, else at a segment start)."""
        corpus = b"".join(documents)
        tokens, offsets = align_documents(documents, segment_length)
        n_val = max(int(len(tokens) * val_fraction), rollout_bytes)
        _check_size(len(tokens), n_val + rollout_bytes)
        split = (len(tokens) - n_val) // segment_length * segment_length
        # Move the split back to the last file start before it (whole files held out), as long as
        # that holds out at most twice the share asked for and leaves a rollout to train on.
        lowest = max(rollout_bytes, split - n_val // segment_length * segment_length)
        starts = (offsets[lowest : split + 1 : segment_length] == 0).nonzero()
        if len(starts):
            split = lowest + int(starts[-1]) * segment_length
        return cls(
            train=tokens[:split],
            val=tokens[split:],
            fingerprint={"bytes": len(corpus), "crc32": zlib.crc32(corpus)},
            train_offsets=offsets[:split],
            val_offsets=offsets[split:],
        )


def _check_size(have: int, need: int) -> None:
    if have < need:
        raise UserError(
            f"the corpus has {have:,} bytes; with these settings it needs at least "
            f"{need:,} (one rollout of --segments x --segment-length bytes to "
            "train on and one held out): give more text or smaller settings"
        )


def streams(tokens: Tensor, batch_size: int, rollout_bytes: int) -> Tensor:
    """``[batch_size, rollouts, rollout_bytes]``: ``batch_size`` contiguous streams (fewer when
    the data is too short), each cut into whole rollouts."""
    batch_size = min(batch_size, len(tokens) // rollout_bytes)
    per_stream = len(tokens) // batch_size // rollout_bytes * rollout_bytes
    data = tokens[: batch_size * per_stream].view(batch_size, per_stream)
    return data.view(batch_size, -1, rollout_bytes)


@dataclass
class RolloutInputs:
    """What ``sequence_loss``/``mrbp.backward`` take besides the ids: ``[B, T*L]`` mask and
    labels, ``[B, T]`` resets (each None when not needed)."""

    attention_mask: Tensor | None = None
    labels: Tensor | None = None
    resets: Tensor | None = None


def rollout_inputs(
    model: Memformer,
    ids: Tensor,
    offsets: Tensor | None = None,
    reset_every_segment: bool = False,
) -> RolloutInputs:
    """Mask, labels and resets of a rollout ``ids [B, T*L]`` of aligned documents.

    With ``offsets`` (each byte's position in its document, -1 for padding): padding is masked,
    the memory restarts at each document's first segment, and the targets a fresh run of the
    document would not predict are ignored (decoder: its first byte, predicted from the previous
    document; encoder-decoder: its first segment, decoded from the previous one's encoding).
    ``reset_every_segment`` resets every row before every segment (the no-memory baseline), with
    the same targets.
    """
    L = model.config.segment_length
    out = RolloutInputs()
    if offsets is not None:
        offsets = offsets.to(ids.device)
        mask = offsets != PAD
        out.attention_mask = None if bool(mask.all()) else mask
        not_fresh = offsets == 0 if not model.is_encoder_decoder else (offsets >= 0) & (offsets < L)
        out.labels = ids.masked_fill(not_fresh, IGNORE_INDEX)
        out.resets = offsets[:, ::L] == 0
    if reset_every_segment:
        out.resets = torch.ones(ids.shape[0], -(-ids.shape[1] // L), dtype=torch.bool)
        out.resets = out.resets.to(ids.device)
    return out
