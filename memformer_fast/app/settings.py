"""The settings of a ``train`` run, and what a resumed run keeps of its checkpoint's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..clipping import DEFAULT_FACTOR
from ..config import MemformerConfig
from .errors import UserError


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
    saved = asdict(TrainSettings(**ckpt["settings"]))
    for name in DATA_LAYOUT:
        if name in overrides and overrides[name] != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{ckpt['path']} was trained with {flag} {saved[name]}, not {overrides[name]}: "
                f"drop {flag} to resume"
            )
    saved.update(overrides)
    return TrainSettings(**saved)
