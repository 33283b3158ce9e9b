"""Signals at the CLI boundary (STYLE.md section 8): Ctrl-C (SIGINT) and SIGTERM end any command with exit code
130 or 143 and the one stderr line `LINE`, after the library's `finally` blocks have removed every temporary
output.

While `loratool.cli.main` runs, both signals raise `Interrupted` (a KeyboardInterrupt) in the main thread.
While that exception unwinds (the handler sees it as the exception being handled), later signals are noted
and not raised, so that the clean-up it started runs to its end. Python runs signal handlers in the main
thread only, between bytecodes, and interrupts its blocking waits (locks, joins, futures) to run them; worker
threads stop on the cancel events the unwinding main thread sets.

Not every moment can take an exception. Inside an import, extension modules run C++ that is not
exception-safe: torch aborts natively ("terminate called after throwing ... error_already_set") when the
exception lands in its distributed package's initialisation, and clears it (leaving numpy half imported) when
it lands in numpy's. So a signal that arrives while a module is imported is noted, and raised once the import
has returned. And code may swallow the exception (a `__del__` can only report it). Both are covered by a
watchdog thread that, from the first signal until the boundary has it, asks the main thread every RECHECK_S
seconds to run the handler again (`_thread.interrupt_main`: no real signal, so no EINTR inside C++; the
handler runs when the main thread next runs Python code); where the interrupt is neither unwinding nor inside
an import, the handler raises it.

A signal that arrives once an output has started to move into place (`fsutil.published` has risen) is noted and
not raised either: the command has done its work, finishes what is left (printing its summary) and exits 0, so
that "nothing was written" is never said of a file that exists.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading

LINE = "interrupted; nothing was written"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
RECHECK_S = 0.01  # the watchdog's period: how late a deferred or swallowed interrupt is raised


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
        raised: whether an Interrupted has been raised (it may have been swallowed since).
        closed: set by the boundary once the command has returned or raised; signals are then only noted.
    """

    def __init__(self):
        self.signum = 0
        self.raised = False
        self.closed = False
        self._saved: dict = {}
        self._fsutil = None
        self._start = 0
        self._hook = None
        self._done = threading.Event()  # stops the watchdog
        self._watchdog: threading.Thread | None = None

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
        if self._saved:
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        from .. import fsutil  # after the handlers: a signal during this import is already an Interrupted

        self._start = fsutil.published()
        self._fsutil = fsutil

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        self._uninstall(None)

    def ignore(self) -> None:
        """Ignore both signals from now on (SIG_IGN, which outlasts the interpreter's own shutdown, where
        Python handlers are reset to the default): for a process whose exit code is decided."""
        self._uninstall(signal.SIG_IGN)

    def _uninstall(self, replacement) -> None:
        self.closed = True
        self._done.set()
        if self._watchdog is not None:  # before the handlers go: its last signal must still find ours
            self._watchdog.join()
        while self._saved:
            sig, previous = self._saved.popitem()
            signal.signal(sig, previous if replacement is None else replacement)
        if self._hook is not None:
            sys.unraisablehook, self._hook = self._hook, None

    def published(self) -> bool:
        """Whether an output has started to move into place since `install`."""
        return self._fsutil is not None and self._fsutil.published() > self._start

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
        if self.closed or self.published() or (self.raised and _unwinding()):
            return
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="loratool-interrupt", daemon=True)
            self._watchdog.start()
        if _importing(frame):
            return  # raised by a later call from the watchdog, once the import has returned
        self.raised = True
        raise Interrupted(self.signum)

    def _watch(self) -> None:
        while not self._done.wait(RECHECK_S) and not self.closed:
            _thread.interrupt_main(self.signum)

    def _unraisable(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, Interrupted):
            return  # swallowed by a __del__ or a callback: the watchdog raises it again, no report needed
        self._hook(unraisable)


def _importing(frame) -> bool:
    """Whether `frame` runs inside an import (importlib's frames are on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _unwinding() -> bool:
    """Whether the main thread is handling an interrupt (in an except, finally or __exit__ it runs), directly
    or as the cause of the exception it handles."""
    exc, seen = sys.exc_info()[1], set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__context__
    return False
