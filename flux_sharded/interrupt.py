"""Ctrl-C, never lost.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is at that moment.
Two places lose it: a finalizer (a `__del__`, a weakref callback) running then prints "Exception
ignored in ..." and carries on, and a library that wraps what it caught (`except Exception`-style
handlers that re-raise their own error from a BaseException) turns it into a failure. The process
would then compute on until its launcher kills it (torchrun: SIGKILL 30 s after it passed the
signal on) or report a failed stage, and the user would never read how to continue.

So a press is also remembered: `check()`, called by the runner between stages and at every
denoising step and image, raises it again, and the command line treats an error that follows a
press as the interruption it is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_pressed = threading.Event()


def _on_ctrl_c(signum, frame) -> None:
    _pressed.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def remembered() -> Iterator[None]:
    """Inside the block, SIGINT raises KeyboardInterrupt as usual and is remembered (`pressed`).

    Only in the main thread and only where SIGINT has Python's default handler (a launcher that
    started this process with SIGINT ignored keeps it ignored); the previous handler is restored."""
    previous = signal.getsignal(signal.SIGINT)
    install = threading.current_thread() is threading.main_thread() and previous is signal.default_int_handler
    _pressed.clear()
    if install:
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        yield
    finally:
        if install and signal.getsignal(signal.SIGINT) is _on_ctrl_c:
            signal.signal(signal.SIGINT, previous)


def pressed() -> bool:
    """Whether SIGINT arrived inside `remembered()`."""
    return _pressed.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived, even if where it first landed swallowed it."""
    if _pressed.is_set():
        raise KeyboardInterrupt
