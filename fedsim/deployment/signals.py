"""Signal handling while a local federation's processes start and stop.

Ctrl-C, SIGTERM and SIGHUP become an exception, except inside a deferred section,
where they are held until it ends.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

TERMINATION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TerminationGuard:
    """Turns Ctrl-C, SIGTERM and SIGHUP into an exception, except inside `deferred()`.

    A signal that arrives while processes are being started or stopped is held and
    raised when that section ends, so a started process is always recorded and a
    stop always completes. Handlers can only be set in the main thread; elsewhere
    the guard does nothing and the caller must stop the federation itself.
    """

    def __init__(self) -> None:
        self._saved: dict[int, object] = {}
        self._deferring = 0
        self._pending: int | None = None

    def install(self) -> None:
        """Take over the signals (main thread only), remembering the handlers replaced."""
        if threading.current_thread() is threading.main_thread():
            self._saved = {sig: signal.signal(sig, self._handle) for sig in TERMINATION_SIGNALS}

    def restore(self) -> None:
        """Give the signals back to the handlers they had before `install`."""
        for sig, handler in self._saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._saved = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = signum
        else:
            _raise_for(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold the signals until the block ends, then raise the last one that came."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            pending, self._pending = self._pending, None
            if pending is not None and not self._deferring:
                _raise_for(pending)


def _raise_for(signum: int) -> None:
    """KeyboardInterrupt for Ctrl-C (as Python does), SystemExit(128 + n) otherwise."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)
