"""Byte-level language modelling with MRBP: the training loop (:class:`Trainer`).

Its settings (:mod:`.settings`), checkpoints (:mod:`.checkpoint`), stop signals (:mod:`.signals`)
and output folder (:mod:`.disk`) have modules of their own; the names the command line and the
tests use are importable from here too.

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
import io
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import mrbp
from ..clipping import SpikeClip
from ..config import MemformerConfig
from ..model import Memformer
from . import disk
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    capture_rng,
    checksum,
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    restore_rng,
)
from .data import ByteData, RolloutInputs, rollout_inputs, streams
from .errors import UserError, first_line
from .evaluation import token_nll
from .settings import TrainSettings, resumed_config, resumed_settings
from .signals import Stopped, signals_deferred, signals_stop

# The names the command line and the tests import from here; each is defined in the module of
# its job (settings, checkpoint, signals, disk).
__all__ = [
    "CHECKPOINT_NAME",
    "EvalResult",
    "Stopped",
    "TrainSettings",
    "Trainer",
    "checksum",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "resumed_config",
    "resumed_settings",
]


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
        trainer.rng_state = capture_rng(model.device)
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
            with signals_deferred():  # a signal mid-write would leave the temporary file
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    disk.write_file(tmp, buffer.getbuffer())
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
                f"could not save {path} (step {self.step}): {disk.os_reason(error)}; {kept}"
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
            raise UserError(f"{where} does not match its own config: {first_line(error)}") from None
        trainer = cls(
            model,
            optimizer,
            data,
            settings,
            step=int(ckpt["step"]),
            memory=None if memory is None else memory.to(model.device),
            history=list(ckpt["history"]),
            rng_state=ckpt["rng"],
            pending_eval=ckpt["pending_eval"],
            saved_step=int(ckpt["step"]),
        )
        trainer.clip.load_state_dict(ckpt["grad_clip"])
        restore_rng(trainer.rng_state, model.device)
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
        with signals_deferred():  # the commit is all or nothing, even under Ctrl-C or SIGTERM
            norm = self.clip(self.model.parameters())  # a non-finite norm leaves clip as it was
            if not bool(torch.isfinite(norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(f"the gradient norm of step {self.step + 1} is not finite")
            for group in self.optimizer.param_groups:
                group["lr"] = self.settings.lr_at(self.step)
            self.optimizer.step()
            self.memory = result.memory
            self.step += 1
            self.rng_state = capture_rng(self.model.device)
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
            with signals_stop() as stop_request:
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
            f"training diverged: {first_line(error)}; {kept}. Try a lower --lr (now "
            f"{self.settings.lr:g}) or a longer warm-up (--warmup-steps, now "
            f"{self.settings.warmup_steps}), then --resume"
        )


def _optimizer(model: Memformer, settings: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
