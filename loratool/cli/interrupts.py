"""Signals at the CLI boundary (STYLE.md section 8): Ctrl-C (SIGINT) and SIGTERM end any command with exit code
130 or 143 and the one stderr line `LINE`, after the library's `finally` blocks have removed every temporary
output.

While `loratool.cli.main` runs, both signals raise `Interrupted` (a KeyboardInterrupt) in the main thread, once:
later signals are noted and not raised, so that the clean-up the first one started runs to its end. Python runs
signal handlers in the main thread only, between bytecodes, and interrupts its blocking waits (locks, joins,
futures) to run them; worker threads stop on the cancel events the unwinding main thread sets.

A signal that arrives once an output has started to move into place (`fsutil.published` has risen) is noted and
not raised either: the command has done its work, finishes what is left (printing its summary) and exits 0, so
that "nothing was written" is never said of a file that exists.
"""

from __future__ import annotations

import signal
import sys
import threading

LINE = "interrupted; nothing was written"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread by the CLI's handler.

    Attributes:
        signum: the signal. exit_code: 128 + signum (130 for SIGINT, 143 for SIGTERM), as shells report it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class Handlers:
    """The CLI's handlers for SIGINT and SIGTERM, from `install()` until `restore()` (see the module docstring).

    Attributes:
        signum: the first signal received, 0 before any.
        raised: whether an Interrupted has been raised.
        closed: set by the boundary once the command has returned or raised; signals are then only noted.
    """

    def __init__(self):
        self.signum = 0
        self.raised = False
        self.closed = False
        self._saved: dict = {}
        self._fsutil = None
        self._start = 0

    def install(self) -> None:
        """Take over both signals in the main thread (elsewhere Python allows no handlers: nothing changes).

        A signal that whoever started the process set to be ignored (a background job's SIGINT) stays ignored.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            signal.signal(sig, self._handle)
            self._saved[sig] = previous
        from .. import fsutil  # after the handlers: a signal during this import is already an Interrupted

        self._start = fsutil.published()
        self._fsutil = fsutil

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        while self._saved:
            sig, previous = self._saved.popitem()
            signal.signal(sig, previous)

    def ignore(self) -> None:
        """Ignore both signals from now on (SIG_IGN, which outlasts the interpreter's own shutdown, where
        Python handlers are reset to the default): for a process whose exit code is decided."""
        while self._saved:
            sig, _ = self._saved.popitem()
            signal.signal(sig, signal.SIG_IGN)

    def published(self) -> bool:
        """Whether an output has started to move into place since `install`."""
        return self._fsutil is not None and self._fsutil.published() > self._start

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if self.raised or self.closed or self.published():
            return
        self.raised = True
        raise Interrupted(self.signum)
