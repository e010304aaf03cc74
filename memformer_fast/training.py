"""Byte-level language modelling with MRBP: data, training loop, evaluation and checkpoints.

The corpus (a file, or every text file under a folder) is one byte stream. The last part is held
out; the rest is cut into ``batch_size`` contiguous streams that are read ``segments * L`` bytes
at a time, so each rollout continues where the previous one stopped and the memory is carried
from one rollout to the next (reset when the streams wrap around). The data position is a
function of the step, so a checkpoint needs only the step, the model, the optimizer, the carried
memory and the random state to continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import mrbp
from .config import MemformerConfig
from .model import Memformer

CHECKPOINT_FORMAT = "memformer_fast.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
VOCAB_SIZE = 256  # bytes; token 0 (NUL, absent from text) doubles as BOS


class UserError(Exception):
    """A problem with what the user gave (a path, a checkpoint, a flag): the message says what
    and how to fix it; the CLI prints it on one line and exits with status 2."""


# ---------------------------------------------------------------------------------------- data


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


def load_corpus(
    path: str | os.PathLike, pattern: str | None = None, max_bytes: int | None = None
) -> tuple[bytes, int]:
    """The bytes of :func:`corpus_files` concatenated (the first ``max_bytes``: files after
    those are not even opened) and the number of files they come from."""
    chunks, total = [], 0
    for file in corpus_files(path, pattern):
        try:
            data = file.read_bytes()
        except OSError as error:
            raise UserError(f"cannot read {file}: {error.strerror or error}") from None
        if max_bytes is not None:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks and Path(path).is_dir():
        what = f" matching {pattern!r}" if pattern else ""
        raise UserError(f"no text files{what} under {path}")
    corpus = b"".join(chunks)
    if not corpus:
        raise UserError(f"{path} is empty: there is nothing to train on")
    return corpus, len(chunks)


@dataclass(frozen=True)
class ByteData:
    """A corpus split into a training and a held-out part, as token tensors."""

    train: Tensor
    val: Tensor
    fingerprint: dict[str, int]

    @classmethod
    def from_bytes(cls, corpus: bytes, rollout_bytes: int, val_fraction: float) -> ByteData:
        """Hold out ``val_fraction`` of the bytes (at least one rollout's worth) at the end."""
        n_val = max(int(len(corpus) * val_fraction), rollout_bytes)
        if len(corpus) < n_val + rollout_bytes:
            raise UserError(
                f"the corpus has {len(corpus):,} bytes; with these settings it needs at least "
                f"{n_val + rollout_bytes:,} (one rollout of --segments x --segment-length bytes to "
                "train on and one held out): give more text or smaller settings"
            )
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        return cls(
            train=tokens[:-n_val],
            val=tokens[-n_val:],
            fingerprint={"bytes": len(corpus), "crc32": zlib.crc32(corpus)},
        )


def streams(tokens: Tensor, batch_size: int, rollout_bytes: int) -> Tensor:
    """``[batch_size, rollouts, rollout_bytes]``: ``batch_size`` contiguous streams (fewer when
    the data is too short), each cut into whole rollouts."""
    batch_size = min(batch_size, len(tokens) // rollout_bytes)
    per_stream = len(tokens) // batch_size // rollout_bytes * rollout_bytes
    data = tokens[: batch_size * per_stream].view(batch_size, per_stream)
    return data.view(batch_size, -1, rollout_bytes)


# ------------------------------------------------------------------------------------ settings


@dataclass
class TrainSettings:
    """Everything that defines a training run besides the data and the model's shape."""

    batch_size: int = 8
    segments: int = 4  # segments per MRBP rollout
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_bytes: int = 65536
    save_every: int = 200
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "segments", "eval_every", "eval_bytes", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.steps < 0 or self.warmup_steps < 0:
            raise UserError("--steps and --warmup-steps must be >= 0")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant: the schedule does not depend on ``steps``, so a run
        can be extended by resuming with a larger ``--steps``."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))


# Settings that fix how the data is laid out: a resumed run must keep them.
DATA_LAYOUT = ("batch_size", "segments", "val_fraction")


def config_to_dict(config: MemformerConfig) -> dict[str, Any]:
    d = asdict(config)
    d["memory_dtype"] = str(config.memory_dtype).removeprefix("torch.")
    return d


def config_from_dict(d: dict[str, Any]) -> MemformerConfig:
    d = dict(d)
    d["memory_dtype"] = getattr(torch, d["memory_dtype"])
    return MemformerConfig(**d)


# ----------------------------------------------------------------------------------- trainer


@dataclass
class EvalResult:
    step: int
    bits_per_byte: float
    loss: float


@dataclass
class Trainer:
    """MRBP training of a byte-level :class:`Memformer` with exact checkpoint/resume.

    Build one with :meth:`create` or :meth:`resume`, then call :meth:`train`.
    """

    model: Memformer
    optimizer: torch.optim.Optimizer
    data: ByteData
    settings: TrainSettings
    step: int = 0
    memory: Tensor | None = None  # carried into the next rollout; None = the initial memory
    history: list[dict[str, float]] = field(default_factory=list)
    rng_state: dict[str, Any] = field(default_factory=dict)  # at the last completed step

    @classmethod
    def create(
        cls, config: MemformerConfig, data: ByteData, settings: TrainSettings, device: str = "cpu"
    ) -> Trainer:
        torch.manual_seed(settings.seed)
        model = Memformer(config).to(device)
        trainer = cls(model, _optimizer(model, settings), data, settings)
        trainer.rng_state = _capture_rng(model.device)
        return trainer

    # -------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.model.config),
            "settings": asdict(self.settings),
            "data": self.data.fingerprint,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "memory": None if self.memory is None else self.memory.cpu(),
            "rng": self.rng_state,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically: a crash while writing leaves the previous one intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def resume(
        cls, ckpt: dict[str, Any], data: ByteData, settings: TrainSettings, device: str = "cpu"
    ) -> Trainer:
        """Continue the run of a checkpoint (from :func:`load_checkpoint`) on ``data``.

        ``settings`` come from :func:`resumed_settings`. The data must be the same bytes: a
        mismatch raises :class:`UserError`.
        """
        where = ckpt["path"]
        if ckpt["data"] != data.fingerprint:
            raise UserError(
                f"{where} was trained on other data ({ckpt['data']['bytes']:,} bytes, crc32 "
                f"{ckpt['data']['crc32']:08x}; now {data.fingerprint['bytes']:,} bytes, crc32 "
                f"{data.fingerprint['crc32']:08x}): resume on the same files"
            )
        model = Memformer(config_from_dict(ckpt["config"])).to(device)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer = _optimizer(model, settings)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(
                f"{where} does not match its own config: {_first_line(error)}"
            ) from None
        memory = ckpt["memory"]
        trainer = cls(
            model,
            optimizer,
            data,
            settings,
            step=int(ckpt["step"]),
            memory=None if memory is None else memory.to(model.device),
            history=list(ckpt["history"]),
            rng_state=ckpt["rng"],
        )
        _restore_rng(trainer.rng_state, model.device)
        return trainer

    # ----------------------------------------------------------------------------- training

    @property
    def rollout_bytes(self) -> int:
        return self.settings.segments * self.model.config.segment_length

    def _batch(self, step: int) -> tuple[Tensor, bool]:
        """The rollout of ``step`` ``[B, T*L]`` and whether it starts the streams over."""
        data = streams(self.data.train, self.settings.batch_size, self.rollout_bytes)
        index = step % data.shape[1]
        return data[:, index].to(self.model.device), index == 0

    def train_step(self) -> float:
        """One MRBP update; returns the rollout's mean loss (nats per byte)."""
        ids, restart = self._batch(self.step)
        memory = None if restart or self.memory is None else self.memory
        self.optimizer.zero_grad(set_to_none=True)
        result = mrbp.backward(self.model, ids, memory)
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        with _sigint_deferred():  # the commit is all or nothing, even under Ctrl-C
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr_at(self.step)
            self.optimizer.step()
            self.memory = result.memory
            self.step += 1
            self.rng_state = _capture_rng(self.model.device)
        return float(result.loss)

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Bits per byte on (up to ``eval_bytes`` of) the held-out split, memory carried."""
        data = streams(self.data.val, self.settings.batch_size, self.rollout_bytes)
        per_rollout = data.shape[0] * data.shape[2]
        n = max(1, min(data.shape[1], math.ceil(self.settings.eval_bytes / per_rollout)))
        self.model.eval()
        total = 0.0
        try:
            memory = None
            for i in range(n):
                rollout_loss, memory = self.model.sequence_loss(
                    data[:, i].to(self.model.device), memory
                )
                total += float(rollout_loss)
        finally:
            self.model.train()
        mean = total / n  # every rollout has the same number of predicted bytes
        return EvalResult(self.step, mean / math.log(2), mean)

    def train(
        self,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> str:
        """Train up to ``settings.steps``; evaluate and save periodically and at the end.

        Returns ``"done"``, or ``"interrupted"`` after a KeyboardInterrupt (Ctrl-C), when a
        checkpoint of the last completed step has been saved (if ``checkpoint`` is given).
        """
        from tqdm.auto import tqdm

        s = self.settings
        bar = tqdm(
            total=s.steps,
            initial=min(self.step, s.steps),
            unit="step",
            disable=None if progress else True,  # None: no bar when not on a terminal
            dynamic_ncols=True,
        )
        say = log or bar.write
        bpb = self.history[-1]["bits_per_byte"] if self.history else float("nan")
        tokens, seconds = 0, 0.0
        try:
            while self.step < s.steps:
                start = time.perf_counter()
                loss = self.train_step()
                seconds += time.perf_counter() - start
                tokens += s.batch_size * self.rollout_bytes
                if self.step % s.eval_every == 0 or self.step == s.steps:
                    bpb = self.evaluate().bits_per_byte
                    self.history.append(
                        {"step": self.step, "train_loss": loss, "bits_per_byte": bpb}
                    )
                    say(f"step {self.step}: train loss {loss:.3f}, held-out {bpb:.3f} bits/byte")
                bar.set_postfix(
                    loss=f"{loss:.3f}", val_bpb=f"{bpb:.3f}", bytes_per_s=f"{tokens / seconds:,.0f}"
                )
                bar.update(1)
                if checkpoint and (self.step % s.save_every == 0 or self.step == s.steps):
                    self.save(checkpoint)
        except KeyboardInterrupt:
            bar.close()
            if checkpoint:
                self.save(checkpoint)
            return "interrupted"
        bar.close()
        return "done"


def resumed_config(ckpt: dict[str, Any], overrides: dict[str, Any]) -> MemformerConfig:
    """The checkpoint's model config; ``overrides`` (what the user asked for explicitly) must
    agree with it."""
    config = config_from_dict(ckpt["config"])
    for name, value in overrides.items():
        if getattr(config, name) != value:
            raise UserError(
                f"{ckpt['path']} was trained with {name}={getattr(config, name)!r}, not "
                f"{value!r}: drop that flag to resume, or start a new run with another --out"
            )
    return config


def resumed_settings(ckpt: dict[str, Any], overrides: dict[str, Any]) -> TrainSettings:
    """The checkpoint's settings updated with ``overrides``; the data layout may not change."""
    saved = dict(ckpt["settings"])
    for name in DATA_LAYOUT:
        if name in overrides and overrides[name] != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{ckpt['path']} was trained with {flag} {saved[name]}, not {overrides[name]}: "
                f"drop {flag} to resume"
            )
    saved.update(overrides)
    return TrainSettings(**saved)


def _optimizer(model: Memformer, settings: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint (tensors and plain data only: no code runs on load)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {_first_line(error)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a memformer-fast checkpoint ({CHECKPOINT_FORMAT})")
    missing = {"config", "settings", "data", "step", "model", "optimizer", "memory", "rng"} - set(
        ckpt
    )
    if missing:
        raise UserError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
    ckpt["path"] = str(path)
    try:
        config_from_dict(ckpt["config"])
        TrainSettings(**ckpt["settings"])
    except (TypeError, ValueError, AttributeError, UserError) as error:
        raise UserError(f"{path} has an invalid config: {_first_line(error)}") from None
    return ckpt


def load_model(path: str | os.PathLike, device: str = "cpu") -> Memformer:
    """The model of a checkpoint (a file, or a folder holding ``checkpoint.pt``), in eval mode."""
    ckpt = load_checkpoint(path)
    path = ckpt["path"]
    model = Memformer(config_from_dict(ckpt["config"])).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{path} does not match its own config: {_first_line(error)}") from None
    return model.eval()


def stream_bytes(
    model: Memformer,
    prompt: bytes,
    max_bytes: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> Iterator[int]:
    """Generate ``max_bytes`` bytes after ``prompt``, one at a time, in constant memory."""
    if not prompt:
        raise UserError("the prompt must not be empty")
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
    gen = torch.Generator(model.device).manual_seed(seed)
    for token in model.stream(ids, max_bytes, temperature=temperature, top_k=top_k, generator=gen):
        yield int(token[0])


# ------------------------------------------------------------------------------ randomness


def _capture_rng(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the body has finished, then raise it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
