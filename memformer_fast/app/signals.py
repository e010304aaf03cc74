"""Stop signals: Ctrl-C, SIGTERM and SIGHUP stop a command cleanly, and can be held off while
something must not be cut in half (a checkpoint being written, an update being committed)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
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
    """What the body of :func:`signals_stop` sees of the stop signals: the first one received.

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
def signals_stop() -> Iterator[StopRequest]:
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
