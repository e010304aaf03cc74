"""The application's errors: what the command line turns into one-line messages."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (a path, a checkpoint, a flag): the message says what
    and how to fix it; the CLI prints it on one line and exits with status 2."""


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but something about it deserves a word (no checksum: written by an
    older version)."""
