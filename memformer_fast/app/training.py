"""Byte-level language modelling with MRBP: the settings, the training loop and checkpoints.

The data (:mod:`memformer_fast.app.data`) is read in rollouts that continue where the previous
one stopped, and the memory is carried from one rollout to the next (reset when the streams wrap
around). The data position is a
function of the step, so a checkpoint needs only the step, the model, the optimizer, the carried
memory and the random state to continue exactly where it stopped.

With ``reset_at_file_boundaries`` every file starts a segment (its last segment is padded), the
memory restarts at each file's first segment, and no byte is predicted from another file: each
file is modelled as a fresh run of the model would. ``memory_reset_every_segment`` trains the same
model with its memory reset before every segment: the no-memory baseline at the same parameter
count. :func:`~memformer_fast.app.evaluation.evaluate_documents` measures bits per byte on
held-out files with the memory carried and reset, and by position in the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import math
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import mrbp
from ..clipping import DEFAULT_FACTOR, SpikeClip
from ..config import MemformerConfig
from ..model import Memformer
from .data import ByteData, RolloutInputs, rollout_inputs, streams
from .errors import CheckpointWarning, UserError
from .evaluation import token_nll

CHECKPOINT_FORMAT = "memformer_fast.checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"


# Signals that stop training like Ctrl-C: a checkpoint of the last completed step is saved.
# SIGTERM is how schedulers (Slurm, Kubernetes) stop jobs; SIGHUP comes when the terminal closes.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP during :meth:`Trainer.train` (a
    KeyboardInterrupt, so every handler for Ctrl-C handles it too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    grad_clip: float = 1.0  # the fixed limit of the gradient norm (0: none)
    grad_clip_factor: float = DEFAULT_FACTOR  # and this many times the recent norms' mean (0: off)
    eval_every: int = 200
    eval_bytes: int = 65536
    save_every: int = 200
    val_fraction: float = 0.05
    seed: int = 0
    reset_at_file_boundaries: bool = False  # each file starts a segment with a fresh memory
    memory_reset_every_segment: bool = False  # the no-memory baseline
    compile: bool = False  # each segment's step through torch.compile (mrbp.backward(compile=))

    def __post_init__(self) -> None:
        for name in ("batch_size", "segments", "eval_every", "eval_bytes", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.steps < 0 or self.warmup_steps < 0:
            raise UserError("--steps and --warmup-steps must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a finite number > 0, got {self.lr}")
        if not (self.grad_clip_factor == 0 or self.grad_clip_factor >= 1):
            raise UserError(
                f"--grad-clip-factor must be 0 (off) or >= 1, got {self.grad_clip_factor}"
            )
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant: the schedule does not depend on ``steps``, so a run
        can be extended by resuming with a larger ``--steps``."""
        return self.lr * min(1.0, (step + 1) / max(1, self.warmup_steps))


# Settings that fix how the data is laid out and what is trained: a resumed run must keep them.
DATA_LAYOUT = (
    "batch_size",
    "segments",
    "val_fraction",
    "reset_at_file_boundaries",
    "memory_reset_every_segment",
)


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
    # The history entry of a step whose evaluation has not finished (interrupted): completed
    # first thing by the next train(), so an interruption loses nothing.
    pending_eval: dict[str, float] | None = None
    saved_step: int | None = None  # the step of the checkpoint on disk, if any
    stop_signal: int | None = None  # the signal that stopped the last train(), if any
    clip: SpikeClip = field(init=False)  # its running norm is part of the run's state

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
        """The checkpoint's contents, with a ``checksum`` of everything else in it."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.model.config.to_dict(),
            "settings": asdict(self.settings),
            "data": self.data.fingerprint,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "memory": None if self.memory is None else self.memory.cpu(),
            "rng": self.rng_state,
            "history": self.history,
            "pending_eval": self.pending_eval,
            "grad_clip": self.clip.state_dict(),
        }
        state["checksum"] = checksum(state)
        return state

    def checkpoint_bytes_estimate(self) -> int:
        """About how many bytes a checkpoint takes (parameters, optimizer state, memory)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        memory = 0 if self.memory is None else self.memory.numel() * self.memory.element_size()
        return 3 * params + memory + 256 * 1024  # Adam keeps two moments per parameter

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically: the previous one stays intact until the new one is
        complete on disk, and no temporary file is left behind, whatever goes wrong.

        Raises:
            UserError: the checkpoint could not be written (full disk, read-only folder, ...);
                the message is one line and says what is still on disk.
        """
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with _signals_deferred():  # a signal mid-write would leave the temporary file
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _write_file(tmp, buffer.getbuffer())
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
        except OSError as error:
            kept = (
                f"the checkpoint of step {self.saved_step} is intact"
                if self.saved_step is not None and path.is_file()
                else "no checkpoint was written"
            )
            raise UserError(
                f"could not save {path} (step {self.step}): {_os_reason(error)}; {kept}"
            ) from None
        self.saved_step = self.step
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
        config = MemformerConfig.from_dict(ckpt["config"])
        memory = ckpt["memory"]
        rollout = settings.segments * config.segment_length
        batch = streams(data.train, settings.batch_size, rollout).shape[0]
        if memory is not None and memory.shape[0] != batch:
            raise UserError(
                f"{where} is invalid: memory has batch size {memory.shape[0]}, this run reads "
                f"{batch} streams"
            )
        model = Memformer(config).to(device)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer = _optimizer(model, settings)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(
                f"{where} does not match its own config: {_first_line(error)}"
            ) from None
        trainer = cls(
            model,
            optimizer,
            data,
            settings,
            step=int(ckpt["step"]),
            memory=None if memory is None else memory.to(model.device),
            history=list(ckpt["history"]),
            rng_state=ckpt["rng"],
            pending_eval=ckpt.get("pending_eval"),
            saved_step=int(ckpt["step"]),
        )
        if "grad_clip" in ckpt:  # older checkpoints clipped at the fixed limit only
            trainer.clip.load_state_dict(ckpt["grad_clip"])
        _restore_rng(trainer.rng_state, model.device)
        return trainer

    # ----------------------------------------------------------------------------- training

    @property
    def rollout_bytes(self) -> int:
        return self.settings.segments * self.model.config.segment_length

    def __post_init__(self) -> None:
        self.clip = SpikeClip(
            self.settings.grad_clip or math.inf, self.settings.grad_clip_factor or math.inf
        )
        aligned = self.data.train_offsets is not None
        if aligned != self.settings.reset_at_file_boundaries:
            raise UserError(
                "reset_at_file_boundaries needs the data laid out by file (ByteData.from_documents)"
                if self.settings.reset_at_file_boundaries
                else "data laid out by file (ByteData.from_documents) needs "
                "reset_at_file_boundaries=True"
            )

    def _rollout(
        self, tokens: Tensor, offsets: Tensor | None, index: int
    ) -> tuple[Tensor, RolloutInputs]:
        """Rollout ``index`` of the streams of ``tokens``: ``(ids [B, T*L], RolloutInputs)``."""
        data = streams(tokens, self.settings.batch_size, self.rollout_bytes)
        ids = data[:, index % data.shape[1]].to(self.model.device)
        where = None
        if offsets is not None:
            where = streams(offsets, self.settings.batch_size, self.rollout_bytes)
            where = where[:, index % data.shape[1]]
        inputs = rollout_inputs(self.model, ids, where, self.settings.memory_reset_every_segment)
        return ids, inputs

    def _batch(self, step: int) -> tuple[Tensor, RolloutInputs, bool]:
        """The rollout of ``step`` ``[B, T*L]``, its inputs, and whether it starts the streams
        over."""
        count = streams(self.data.train, self.settings.batch_size, self.rollout_bytes).shape[1]
        ids, inputs = self._rollout(self.data.train, self.data.train_offsets, step)
        return ids, inputs, step % count == 0

    def train_step(self) -> float:
        """One MRBP update; returns the rollout's mean loss (nats per byte).

        Raises:
            FloatingPointError: the loss, the memory or the gradient is not finite; nothing was
                updated (the parameters, optimizer, memory and step are those of before).
        """
        ids, inputs, restart = self._batch(self.step)
        memory = None if restart or self.memory is None else self.memory
        self.optimizer.zero_grad(set_to_none=True)
        result = mrbp.backward(
            self.model,
            ids,
            memory,
            attention_mask=inputs.attention_mask,
            labels=inputs.labels,
            resets=inputs.resets,
            compile=self.settings.compile,
        )
        with _signals_deferred():  # the commit is all or nothing, even under Ctrl-C or SIGTERM
            norm = self.clip(self.model.parameters())  # a non-finite norm leaves clip as it was
            if not bool(torch.isfinite(norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"the gradient norm of step {self.step + 1} is not finite")
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr_at(self.step)
            self.optimizer.step()
            self.memory = result.memory
            self.step += 1
            self.rng_state = _capture_rng(self.model.device)
        return float(result.loss)

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Bits per byte on (up to ``eval_bytes`` of) the held-out split, with the memory as the
        run trains it (carried, reset at file starts, or reset every segment).

        Draws no random numbers (eval mode), so it can be rerun after an interruption.
        """
        data = streams(self.data.val, self.settings.batch_size, self.rollout_bytes)
        per_rollout = data.shape[0] * data.shape[2]
        n = max(1, min(data.shape[1], math.ceil(self.settings.eval_bytes / per_rollout)))
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            memory = None
            for i in range(n):
                ids, inputs = self._rollout(self.data.val, self.data.val_offsets, i)
                nll, memory = token_nll(self.model, ids, memory, inputs)
                scored = ~nll.isnan()
                total += float(nll[scored].double().sum())
                count += int(scored.sum())
        finally:
            self.model.train(was_training)
        mean = total / max(count, 1)
        return EvalResult(self.step, mean / math.log(2), mean)

    def _finish_eval(self, say: Callable[[str], None]) -> float:
        """Evaluate for ``pending_eval`` and move it into the history; returns bits per byte."""
        assert self.pending_eval is not None
        bpb = self.evaluate().bits_per_byte
        entry = {**self.pending_eval, "bits_per_byte": bpb}
        self.history.append(entry)
        self.pending_eval = None
        say(
            f"step {entry['step']}: train loss {entry['train_loss']:.3f}, held-out {bpb:.3f} "
            "bits/byte"
        )
        return bpb

    def train(
        self,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> str:
        """Train up to ``settings.steps``; evaluate and save periodically and at the end.

        Returns ``"done"``, or ``"interrupted"`` after Ctrl-C, SIGTERM or SIGHUP (the signal is
        in ``stop_signal``), when a checkpoint of the last completed step has been saved (if
        ``checkpoint`` is given). An interrupted evaluation is finished by the next call.

        Raises:
            UserError: a checkpoint could not be written, or the loss or gradient stopped being
                finite (then the last checkpoint on disk is kept, or the last finite step is
                saved when there is none; the message says what to try).
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
        self.stop_signal = None
        try:
            with _signals_stop() as stop_request:
                try:
                    if self.pending_eval is not None:
                        bpb = self._finish_eval(say)
                    while self.step < s.steps:
                        stop_request.raise_if_dropped()
                        start = time.perf_counter()
                        loss = self.train_step()
                        seconds += time.perf_counter() - start
                        tokens += s.batch_size * self.rollout_bytes
                        if self.step % s.eval_every == 0 or self.step == s.steps:
                            self.pending_eval = {"step": self.step, "train_loss": loss}
                            bpb = self._finish_eval(say)
                        bar.set_postfix(
                            loss=f"{loss:.3f}",
                            val_bpb=f"{bpb:.3f}",
                            bytes_per_s=f"{tokens / seconds:,.0f}",
                        )
                        bar.update(1)
                        if checkpoint and (self.step % s.save_every == 0 or self.step == s.steps):
                            self.save(checkpoint)
                except KeyboardInterrupt as stop:
                    # Stopping: a second Ctrl-C or SIGTERM (schedulers re-send it, people press
                    # Ctrl-C twice) is ignored until the checkpoint below is on disk.
                    bar.close()
                    self.stop_signal = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
                    if checkpoint:
                        self.save(checkpoint)
                    return "interrupted"
        except FloatingPointError as error:
            bar.close()
            raise UserError(self._diverged(error, checkpoint)) from None
        bar.close()
        return "done"

    def _diverged(self, error: FloatingPointError, checkpoint: str | os.PathLike | None) -> str:
        """Keep (or, when there is none, save) a finite checkpoint; the message says what."""
        if checkpoint and self.saved_step is not None and Path(checkpoint).is_file():
            kept = f"kept the checkpoint of step {self.saved_step} in {checkpoint}"
        elif checkpoint:
            self.save(checkpoint)
            kept = f"saved the last finite step, {self.step}, to {checkpoint}"
        else:
            kept = f"the last finite step is {self.step}"
        return (
            f"training diverged: {_first_line(error)}; {kept}. Try a lower --lr (now "
            f"{self.settings.lr:g}) or a longer warm-up (--warmup-steps, now "
            f"{self.settings.warmup_steps}), then --resume"
        )


def resumed_config(ckpt: dict[str, Any], overrides: dict[str, Any]) -> MemformerConfig:
    """The checkpoint's model config; ``overrides`` (what the user asked for explicitly) must
    agree with it."""
    config = MemformerConfig.from_dict(ckpt["config"])
    for name, value in overrides.items():
        if getattr(config, name) != value:
            raise UserError(
                f"{ckpt['path']} was trained with {name}={getattr(config, name)!r}, not "
                f"{value!r}: drop that flag to resume, or start a new run with another --out"
            )
    return config


def resumed_settings(ckpt: dict[str, Any], overrides: dict[str, Any]) -> TrainSettings:
    """The checkpoint's settings updated with ``overrides``; the data layout may not change."""
    saved = {**asdict(TrainSettings()), **ckpt["settings"]}  # older checkpoints lack new fields
    if "grad_clip_factor" not in ckpt["settings"]:  # clipped at the fixed limit only
        saved["grad_clip_factor"] = 0.0
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
    """Load and check a checkpoint (tensors and plain data only: no code runs on load).

    Every field is validated (config, settings, step, model and optimizer tensors finite, the
    memory's shape, dtype and values, the random state, the history), then the contents are
    compared with the checksum written with them. A checkpoint written before checksums existed
    is verified against its zip CRCs instead, with a :class:`CheckpointWarning`.

    Raises:
        UserError: no file, not a checkpoint, or a corrupted or hand-edited one; the message
            names what is wrong.
    """
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
    required = {"config", "settings", "data", "step", "model", "optimizer", "memory", "rng"}
    missing = (required | {"history"}) - set(ckpt)
    if missing:
        raise UserError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
    try:
        config = MemformerConfig.from_dict(ckpt["config"])
        TrainSettings(**ckpt["settings"])
    except (TypeError, ValueError, AttributeError, KeyError, UserError) as error:
        raise UserError(f"{path} has an invalid config: {_first_line(error)}") from None
    problem = _invalid_field(ckpt, config)
    if problem:
        raise UserError(f"{path} is invalid (hand-edited or corrupted?): {problem}")
    if "checksum" in ckpt:
        problem = verify_checksum(ckpt)
        if problem:
            raise UserError(
                f"{path} is corrupted: {problem} (the file changed after it was written); "
                "restore a copy or start a new run"
            )
    else:
        bad = _zip_crc_failure(path)
        if bad:
            raise UserError(f"{path} is corrupted: {bad} fails its zip CRC check")
        warnings.warn(
            f"{path} has no checksum (written by an older version): checked against its zip "
            "CRCs only; the next save adds one",
            CheckpointWarning,
            stacklevel=2,
        )
    ckpt["path"] = str(path)
    return ckpt


def _invalid_field(ckpt: dict[str, Any], config: MemformerConfig) -> str | None:
    """What is wrong with the fields of a loaded checkpoint, or None."""
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"step must be an int >= 0, got {step!r}"
    data = ckpt["data"]
    if not (isinstance(data, dict) and all(isinstance(data.get(k), int) for k in DATA_KEYS)):
        return f"data must be a dict with int fields {list(DATA_KEYS)}, got {data!r}"
    for name in ("model", "optimizer"):
        tensors = _tensors(ckpt[name], name)
        if not isinstance(ckpt[name], dict) or (name == "model" and not tensors):
            return f"{name} must be a state dict of tensors"  # (no optimizer state before step 1)
        for where, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{where} is not finite"
    if not isinstance(ckpt["optimizer"].get("param_groups"), list):
        return "optimizer has no param_groups"
    memory = ckpt["memory"]
    if memory is not None:
        c = config
        if not isinstance(memory, Tensor):
            return f"memory must be a tensor or None, got {type(memory).__name__}"
        if memory.dim() != 3 or list(memory.shape[1:]) != [c.n_memory_slots, c.d_model]:
            return (
                f"memory must have shape [B, {c.n_memory_slots}, {c.d_model}] (batch, slots, "
                f"width), got {list(memory.shape)}"
            )
        if memory.dtype != c.memory_dtype:
            return f"memory must have dtype {c.memory_dtype}, got {memory.dtype}"
        if not bool(torch.isfinite(memory).all()):
            return "memory is not finite"
    problem = _invalid_rng(ckpt["rng"])
    if problem:
        return problem
    if "grad_clip" in ckpt:
        try:
            SpikeClip().load_state_dict(ckpt["grad_clip"])
        except ValueError as error:
            return f"grad_clip: {error}"
    history = ckpt["history"]
    entry_keys = {"step", "train_loss", "bits_per_byte"}
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and set(h) == entry_keys for h in history
    ):
        return f"history must be a list of dicts with keys {sorted(entry_keys)}"
    pending = ckpt.get("pending_eval")
    if pending is not None and not (
        isinstance(pending, dict) and set(pending) == {"step", "train_loss"}
    ):
        return "pending_eval must be None or a dict with keys ['step', 'train_loss']"
    return None


def _invalid_rng(rng: object) -> str | None:
    """What is wrong with a saved random state, or None (tried on a scratch generator)."""
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), Tensor):
        return "rng must be a dict holding the 'torch' generator state"
    for key, state in rng.items():
        if key not in ("torch", "cuda") or not isinstance(state, Tensor):
            return f"rng has an unexpected entry {key!r}"
        if state.dtype != torch.uint8 or state.dim() != 1:
            return f"rng[{key!r}] must be a 1-D uint8 tensor, got {state.dtype} {list(state.shape)}"
    try:
        torch.Generator().set_state(rng["torch"])
    except RuntimeError as error:
        return f"rng['torch'] is not a CPU generator state: {_first_line(error)}"
    return None


DATA_KEYS = ("bytes", "crc32")


def _tensors(obj: object, prefix: str) -> dict[str, Tensor]:
    """Every tensor inside nested dicts/lists/tuples, by path (``model/embed.weight``)."""
    found: dict[str, Tensor] = {}

    def walk(where: str, value: object) -> None:
        if isinstance(value, Tensor):
            found[where] = value
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(f"{where}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{where}/{i}", item)

    walk(prefix, obj)
    return found


def _plain_fields(obj: object, prefix: str, out: list[str]) -> None:
    """``path=repr`` of every non-tensor leaf (lists and dict keys in a stable order)."""
    if isinstance(obj, Tensor):
        return
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            _plain_fields(obj[key], f"{prefix}/{key}", out)
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _plain_fields(item, f"{prefix}/{i}", out)
    else:
        out.append(f"{prefix}={obj!r}")


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CHECKED_FIELDS = ("config", "settings", "data", "step", "model", "optimizer", "memory", "rng",
                  "history", "pending_eval")  # fmt: skip
LATER_CHECKED_FIELDS = ("grad_clip",)  # checked when present: older checksums do not cover them


def checksum(state: dict[str, Any]) -> dict[str, Any]:
    """sha256 of every tensor of a checkpoint (by path) and one of all its other fields."""
    fields = {k: state.get(k) for k in CHECKED_FIELDS}
    fields.update({k: state[k] for k in LATER_CHECKED_FIELDS if k in state})
    plain: list[str] = []
    _plain_fields(fields, "", plain)
    return {
        "algorithm": "sha256",
        "tensors": {k: _tensor_digest(t) for k, t in _tensors(fields, "").items()},
        "fields": hashlib.sha256("\n".join(plain).encode()).hexdigest(),
    }


def verify_checksum(ckpt: dict[str, Any]) -> str | None:
    """What does not match the checksum stored in ``ckpt``, or None."""
    stored = ckpt["checksum"]
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
        return "its checksum entry is malformed"
    actual = checksum(ckpt)
    expected_tensors = stored.get("tensors")
    if not isinstance(expected_tensors, dict):
        return "its checksum entry is malformed"
    for where in sorted(set(actual["tensors"]) | set(expected_tensors)):
        if actual["tensors"].get(where) != expected_tensors.get(where):
            return f"tensor {where.lstrip('/')} does not match its sha256 checksum"
    if actual["fields"] != stored.get("fields"):
        return "its fields (step, config, settings, history, ...) do not match their checksum"
    return None


def _zip_crc_failure(path: Path) -> str | None:
    """The first member of the checkpoint's zip whose CRC fails, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"the archive ({_first_line(error)})"


def load_model(path: str | os.PathLike, device: str = "cpu") -> Memformer:
    """The model of a checkpoint (a file, or a folder holding ``checkpoint.pt``), in eval mode."""
    return model_from_checkpoint(load_checkpoint(path), device)


def model_from_checkpoint(ckpt: dict[str, Any], device: str = "cpu") -> Memformer:
    """The model of a checkpoint loaded by :func:`load_checkpoint`, in eval mode."""
    model = Memformer(MemformerConfig.from_dict(ckpt["config"])).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(
            f"{ckpt['path']} does not match its own config: {_first_line(error)}"
        ) from None
    return model.eval()


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
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP until the body has finished, then deliver the first one
    caught to the handler in force before (main thread only: signals never arrive elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: caught.append(signum)) for sig in
                STOP_SIGNALS}  # fmt: skip
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:  # delivered again, now that the handlers in force before are back
        signal.raise_signal(caught[0])


class StopRequest:
    """What the body of :func:`_signals_stop` sees of the stop signals: the first one received.

    Signals after the first are ignored, so a second one (a scheduler re-sending SIGTERM, a second
    Ctrl-C) cannot kill the process in the middle of the save on the way out.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def raise_if_dropped(self) -> None:
        """Raise the first signal's exception again if it never reached the body.

        A handler that runs inside a finalizer (``__del__``, a weakref or GC callback) has its
        exception printed as "Exception ignored" and dropped; the signal is then ignored like a
        second one and the loop would run on. The body calls this between steps.
        """
        if self.signum is not None:
            raise _stop_exception(self.signum)


def _stop_exception(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


@contextlib.contextmanager
def _signals_stop() -> Iterator[StopRequest]:
    """In the body, SIGTERM and SIGHUP raise :class:`Stopped`, handled like Ctrl-C (main thread
    only), and Ctrl-C raises ``KeyboardInterrupt``; the signals after the first are ignored (see
    :class:`StopRequest`)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def stop(signum: int, _frame: object) -> None:
        if request.signum is not None:
            return  # already stopping: let the save on the way out finish
        request.signum = signum
        raise _stop_exception(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_file(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file at ``path`` and force it to disk (OSError on failure)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _os_reason(error: OSError, flag: str = "--out") -> str:
    """One line for an OSError: its errno's text, and a hint for the usual suspects."""
    reason = error.strerror or _first_line(error)
    if error.errno == errno.ENOSPC:
        reason += f" (free some space, or choose another {flag})"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason += f" (choose a writable {flag})"
    return reason


LOCK_NAME = ".lock"


@contextlib.contextmanager
def output_dir_locked(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out`` for one ``train`` run: an exclusive ``flock`` on ``out/.lock``, which names
    its holder. A second run on the same folder fails at once with a :class:`UserError` saying
    who holds it, instead of training next to the first and mistaking its checkpoints for its
    own. The kernel releases the lock when the process ends, however it ends; on the way out the
    lock file is removed, and the folder too when the lock made it and it is still empty.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS: no lock
        yield Path(out)
        return
    out = Path(out)
    made = [p for p in (out, *out.absolute().parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "another process"
            os.close(fd)
            _remove_empty(made)
            raise UserError(
                f"--out {out} is in use by another train run ({holder}): wait for it to finish, "
                "or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed while this one waited to open it
            break
        os.close(fd)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
    try:
        yield out
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) where they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def check_output_dir(out: str | os.PathLike, needed_bytes: int = 0, flag: str = "--out") -> Path:
    """Make sure ``out`` is (or can be made) a folder where a checkpoint can be written, with
    about ``needed_bytes`` free: checked when a run starts, not when its first save fails.
    Creates nothing. ``flag`` names the option in the messages.

    Raises:
        UserError: ``out`` is a file, cannot be created or written, or its disk is too full.
    """
    out = Path(out)
    # The folder is created by the first save; until then, probe the nearest existing ancestor
    # (a probe leaves nothing behind).
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {out}: {existing} is a file, not a folder: choose a folder")
    try:
        if existing == out:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-") as probe:
                probe.write(b"x")
                probe.flush()
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test-"))
    except OSError as error:
        raise UserError(f"{flag} {out} cannot be written: {_os_reason(error, flag)}") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise UserError(
            f"{flag} {out} has {free / 2**20:.1f} MiB free, a checkpoint needs about "
            f"{needed_bytes / 2**20:.1f} MiB: free some space or choose another {flag}"
        )
    return out
