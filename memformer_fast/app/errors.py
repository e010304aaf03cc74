"""The application's errors: what the command line turns into one-line messages."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (a path, a checkpoint, a flag): the message says what
    and how to fix it; the CLI prints it on one line and exits with status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
