"""Checkpoints of a ``train`` run: their format, what is checked when one is loaded (every field,
then a sha256 of every tensor and of the other fields), the model they hold, and the random
state they carry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..clipping import SpikeClip
from ..config import MemformerConfig
from ..model import Memformer
from .errors import UserError, first_line
from .settings import TrainSettings

CHECKPOINT_FORMAT = "memformer_fast.checkpoint/1"


CHECKPOINT_NAME = "checkpoint.pt"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint (tensors and plain data only: no code runs on load).

    Every field is validated (config, settings, step, model and optimizer tensors finite, the
    memory's shape, dtype and values, the random state, the gradient clipping's state, the
    history), then the contents are compared with the checksum written with them.

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
            f"{path} is not a readable checkpoint (corrupt or truncated?): {first_line(error)}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a memformer-fast checkpoint ({CHECKPOINT_FORMAT})")
    missing = {*CHECKED_FIELDS, "checksum"} - set(ckpt)
    if missing:
        raise UserError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
    try:
        config = MemformerConfig.from_dict(ckpt["config"])
        TrainSettings(**ckpt["settings"])
    except (TypeError, ValueError, AttributeError, KeyError, UserError) as error:
        raise UserError(f"{path} has an invalid config: {first_line(error)}") from None
    problem = _invalid_field(ckpt, config)
    if problem:
        raise UserError(f"{path} is invalid (hand-edited or corrupted?): {problem}")
    problem = verify_checksum(ckpt)
    if problem:
        raise UserError(
            f"{path} is corrupted: {problem} (the file changed after it was written); "
            "restore a copy or start a new run"
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
    pending = ckpt["pending_eval"]
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
        return f"rng['torch'] is not a CPU generator state: {first_line(error)}"
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


# Every field of a checkpoint but its checksum, which covers them all.
CHECKED_FIELDS = ("config", "settings", "data", "step", "model", "optimizer", "memory", "rng",
                  "history", "pending_eval", "grad_clip")  # fmt: skip


def checksum(state: dict[str, Any]) -> dict[str, Any]:
    """sha256 of every tensor of a checkpoint (by path) and one of all its other fields."""
    fields = {k: state.get(k) for k in CHECKED_FIELDS}
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
            f"{ckpt['path']} does not match its own config: {first_line(error)}"
        ) from None
    return model.eval()


def capture_rng(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
