"""The command line's one boundary: `main` runs the click group of cli/group.py and turns every way a command
can end into an exit code and at most one line of stderr (STYLE.md sections 3 and 8).

This module imports only the standard library, so that `main` takes over SIGINT and SIGTERM before click,
numpy or torch load; `cli`, `COMMANDS` and `LazyGroup` are the group module's, imported on first use.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from .interrupts import LINE, Handlers

_GROUP_NAMES = ("cli", "COMMANDS", "LazyGroup")
COMPLETE_VAR = "_LORATOOL_COMPLETE"  # click's shell completion, as click's own main reads it
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def __getattr__(name):
    if name in _GROUP_NAMES:
        from . import group

        return getattr(group, name)
    raise AttributeError(f"module 'loratool.cli' has no attribute {name!r}")


def main(argv=None) -> int:
    """Run the loratool command line on `argv` (default sys.argv[1:]) and return its exit code.

    0 success; 1 validate found errors; 2 usage (click's message); 3-7 a LoraToolError (`error: <message>`,
    loratool.errors); 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM (`interrupted; nothing was written`,
    once every temporary output is removed); 141 stdout closed early (quietly). Anything else is a bug and
    raises, with its traceback. The signal handlers are installed for the call and restored when it returns.
    """
    return _main(argv, exiting=False)


def run() -> None:
    """The console script and `python -m loratool`: `main` on the process's arguments, then exit with its code.

    Once the command has ended, SIGINT and SIGTERM are ignored instead of restored: the code is decided, and
    the interpreter's shutdown (0.2 s and more once torch is loaded, with Python's handlers already gone)
    must not turn a finished command into a killed one.
    """
    sys.exit(_main(None, exiting=True))


def _main(argv, exiting: bool) -> int:
    handlers = Handlers()
    try:
        try:
            handlers.install()
            code = _run(argv)
            _report_stale()
            sys.stdout.flush()  # a closed pipe surfaces here, not in the interpreter's exit
        finally:
            handlers.closed = True  # from here on a signal is only noted (no call between: none can land first)
    except BaseException as e:
        code = _exit_code(e, handlers)
    finally:
        if exiting:
            handlers.ignore()
        else:
            handlers.restore()
    return code


def _run(argv) -> int:
    """The group on `argv`: click's parsing, help, usage errors (shown, 2) and the command."""
    import click

    from .group import cli

    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    instruction = os.environ.get(COMPLETE_VAR)
    if instruction:
        from click.shell_completion import shell_complete

        return shell_complete(cli, {}, "loratool", COMPLETE_VAR, instruction)
    # Not cli.main(): click turns a KeyboardInterrupt into "Aborted!" and exit 1, the code of a failed validate.
    try:
        with cli.make_context("loratool", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return 0


def _exit_code(e: BaseException, handlers: Handlers) -> int:
    """The exit code for a command that raised `e`, with its stderr line; re-raises a bug."""
    from ..errors import LoraToolError

    # Once an interrupt was raised, whatever ends the command follows from it: an error met while unwinding,
    # or one met after code swallowed the interrupt (torch leaves a half-imported numpy behind).
    interrupted = isinstance(e, KeyboardInterrupt) or handlers.raised
    if interrupted:
        signum = getattr(e, "signum", 0) or handlers.signum or signal.SIGINT
        # On a terminal, Ctrl-C echoes "^C" without a newline: start the line after it.
        tty = signum == signal.SIGINT and _isatty(sys.stderr)
        # (never reached once an output was published: the handlers raise nothing from then on)
        _say(("\n" if tty else "") + (LINE if not handlers.published() else "interrupted; the output was written"))
        return 128 + signum
    if isinstance(e, SystemExit):  # render.fail() after a LoraToolError, or a command's own exit
        if isinstance(e.code, str):
            _say(e.code)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if isinstance(e, LoraToolError):
        from .render import fail

        try:
            fail(e)
        except SystemExit as done:
            return done.code
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        _quiet_stdout()
        return BROKEN_PIPE
    if isinstance(e, OSError):  # the file system said no (disk full, read-only, no permission): one line, exit 6
        from ..errors import FileError
        from .render import printable

        where = f"{os.fsdecode(e.filename)}: " if e.filename is not None else ""
        _say(printable(f"error: {where}{e.strerror or e}; nothing was written"))
        return FileError.exit_code
    raise e


def _report_stale() -> None:
    """Name on stderr the temporaries of killed runs that this command found beside its output and removed."""
    fsutil = sys.modules.get("loratool.fsutil")
    for path in fsutil.take_stale_removed() if fsutil is not None else ():
        from .render import printable

        _say(printable(f"note: removed {path}, a temporary output left by a run that was killed"))


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed too: the exit code says it
        pass


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush of a closed pipe stays quiet (the recipe
    of Python's signal documentation)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)
