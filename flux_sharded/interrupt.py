"""Ctrl-C, SIGTERM and SIGHUP, never lost.

A run stops the same way whichever of the three arrives: Ctrl-C from a terminal (SIGINT), SIGTERM
from a batch scheduler, `docker stop` or `kill`, SIGHUP from a closed terminal or ssh session. Each
is raised as a KeyboardInterrupt (`Stopped`, which names the signal) wherever the main thread is at
that moment, so the work kept so far stays kept and the command line prints how to continue; the
exit code is the shell's for that signal, 128 + its number (130, 143, 129).

Two places lose such an exception: a finalizer (a `__del__`, a weakref callback) running then
prints "Exception ignored in ..." and carries on, and a library that wraps what it caught
(`except Exception`-style handlers that re-raise their own error from a BaseException) turns it
into a failure. The process would then compute on until its launcher kills it (torchrun: SIGKILL
30 s after it passed the signal on) or report a failed stage, and the user would never read how to
continue. So a signal is also remembered: `check()`, called by the runner between stages and at
every denoising step and image, raises it again, and the command line treats an error that follows
one as the interruption it is.

Before the command line is imported (click, numpy, torch: a second or more), nothing has been
written: `exit_while_starting()` makes a signal then end the process at once with one line, instead
of a KeyboardInterrupt raised inside some library's import (seen as a RecursionError through numpy).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

# The signals that stop a run, each with the handler Python starts a process with: a launcher that
# started this process with one of them ignored (or handled) keeps it so.
STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                signal.SIGHUP: signal.SIG_DFL}

_received: list[int] = []  # the signals that arrived inside remembered(), in order


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop(signum, frame) -> None:
    _received.append(signum)
    raise Stopped(signum)


def _exit_at_once(signum, frame) -> None:
    # Nothing of the run exists yet; os.write and os._exit, because no exception may unwind through
    # an import half done.
    os.write(2, f"\nInterrupted ({signal.Signals(signum).name}) while starting; nothing was written.\n".encode())
    os._exit(exit_code(signum))


def _installable(signum: int) -> bool:
    return (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signum) in (STOP_SIGNALS[signum], _exit_at_once))


def exit_while_starting() -> None:
    """Until remembered() takes over, a stop signal ends the process at once (exit 128 + signal)
    with one line; only where the signal has Python's default handler."""
    for signum in STOP_SIGNALS:
        if _installable(signum):
            signal.signal(signum, _exit_at_once)


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Inside the block, SIGINT, SIGTERM and SIGHUP raise `Stopped` (a KeyboardInterrupt) and are
    remembered (`pressed`, `exit_code`).

    Only in the main thread and only where the signal has Python's default handler (or
    exit_while_starting's); the previous handlers are restored."""
    installed = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS if _installable(signum)}
    _received.clear()
    for signum in installed:
        signal.signal(signum, _on_stop)
    try:
        yield
    finally:
        for signum, previous in installed.items():
            if signal.getsignal(signum) is _on_stop:
                signal.signal(signum, previous)


def pressed() -> bool:
    """Whether a stop signal arrived inside `remembered()`."""
    return bool(_received)


def exit_code(signum: int | None = None) -> int:
    """The shell's exit code for a process stopped by `signum` (default: the first signal that
    arrived, else SIGINT: a KeyboardInterrupt raised by no handler of ours is a Ctrl-C)."""
    if signum is None:
        signum = _received[0] if _received else signal.SIGINT
    return 128 + int(signum)


def ignore_more() -> None:
    """Ignore further stop signals while the process says how to continue and exits: a launcher
    passes the terminal's Ctrl-C on once more (torchrun sends SIGINT to its workers when it gets
    its own), and a second signal must not break that message with a traceback."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def check() -> None:
    """Raise Stopped if a stop signal arrived, even if where it first landed swallowed it."""
    if _received:
        raise Stopped(_received[0])
