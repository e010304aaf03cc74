"""The output folder of a run: checked before it starts (writable, room for a checkpoint), held
by one run at a time, and files forced to disk."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, first_line


def write_file(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file at ``path`` and force it to disk (OSError on failure)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def os_reason(error: OSError, flag: str = "--out") -> str:
    """One line for an OSError: its errno's text, and a hint for the usual suspects."""
    reason = error.strerror or first_line(error)
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
        raise UserError(f"{flag} {out} cannot be written: {os_reason(error, flag)}") from None
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise UserError(
            f"{flag} {out} has {free / 2**20:.1f} MiB free, a checkpoint needs about "
            f"{needed_bytes / 2**20:.1f} MiB: free some space or choose another {flag}"
        )
    return out
