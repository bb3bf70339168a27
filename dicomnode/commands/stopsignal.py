"""SIGINT/SIGTERM as a flag the main thread polls, safe against the signal-handler deadlock.

A handler that calls ``threading.Event.set()`` can deadlock the process: Python runs handlers in
the main thread between bytecodes, and if the signal lands while the main thread is inside
``Event.wait()`` holding the event's (non-reentrant) lock, ``set()`` waits for that lock forever.
That was seen as a ``dicomnode triton`` that never exited after SIGTERM. Here the handler only
stores the signal number (no lock, no logging); the wait is a ``select`` on the interpreter's
wakeup pipe, so a signal still ends the wait at once.
"""
from __future__ import annotations

import os
import select
import signal
from types import FrameType


class StopSignals:
    """Install handlers for ``signals`` (main thread only) and wait for one of them.

    Raises ValueError (from :func:`signal.signal`) when not called from the main thread.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.received: int | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handler) for s in signals}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum  # a plain store: nothing here may take a lock

    def wait(self, timeout_s: float) -> bool:
        """True once a stop signal has arrived; else waits up to ``timeout_s`` for one."""
        if self.received is None and timeout_s > 0:
            select.select([self._r], [], [], timeout_s)
            try:
                while os.read(self._r, 512):
                    pass
            except BlockingIOError:
                pass
        return self.received is not None

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd, close the pipe."""
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)
