"""One exception tree. The CLI prints `error: <message>` and exits with the class's exit code.

Exit codes (also in README.md): 0 ok, 1 `validate` found errors, 2 command-line usage,
3 input breaks the spec or its dialect, 4 adapter does not fit its base, 5 numeric problem,
6 file-system problem, 7 recognised but unsupported input; the CLI adds 130 (SIGINT), 141 (stdout closed)
and 143 (SIGTERM).
"""

from __future__ import annotations


class LoraToolError(Exception):
    """Base class: a user-facing problem with a one-sentence message."""

    exit_code = 3

    def __init__(self, message: str, findings: list | None = None):
        super().__init__(message)
        self.findings = list(findings or [])


class UsageError(LoraToolError):
    """A command-line or call mistake: an option that does not apply, values that do not go together."""

    exit_code = 2


class SpecError(LoraToolError):
    """A file breaks the loratool spec or the rules of the dialect it was read as."""

    exit_code = 3


class MismatchError(LoraToolError):
    """An adapter does not fit its base: a missing target, a shape or layout that disagrees."""

    exit_code = 4


class NumericError(LoraToolError):
    """A numeric problem: a non-finite result, a rank larger than the matrix, an overflow on cast."""

    exit_code = 5


class FileError(LoraToolError):
    """A file-system problem: missing input, refused overwrite, output that is an input."""

    exit_code = 6


# What an errno means to someone running a command, and what to do about it (the one mapping of file-system
# errors: fsutil.os_errors and the readers use it; strerror's own words for the rest).
_ERRNO_MEANINGS = {
    "ENOSPC": "no space left on the device; free some space or write elsewhere",
    "EDQUOT": "disk quota exceeded; free some space or write elsewhere",
    "EACCES": "permission denied; check the permissions or use another path",
    "EPERM": "operation not permitted; check the permissions or use another path",
    "EROFS": "read-only file system; write elsewhere",
    "EISDIR": "is a folder where a file was expected",
    "ENOTDIR": "a part of the path is not a folder",
    "ENAMETOOLONG": "name too long for the file system; choose a shorter name",
}


def os_error_message(e: OSError) -> str:
    """What the OSError's errno means, in a few words with the fix (its strerror for errnos not listed)."""
    import errno

    name = errno.errorcode.get(e.errno or 0, "")
    return _ERRNO_MEANINGS.get(name) or e.strerror or str(e)


class UnsupportedError(LoraToolError):
    """An input loratool recognises but cannot process exactly (the message says why)."""

    exit_code = 7


class UsageError(LoraToolError):
    """A request the operation cannot carry out as asked: an output name whose format it cannot write."""

    exit_code = 2


EXIT_CODES = {
    0: "success",
    1: "validate found at least one error (or a warning under --strict)",
    2: "command-line usage error",
    SpecError.exit_code: "input breaks the spec or the rules of its dialect",
    MismatchError.exit_code: "adapter does not fit its base",
    NumericError.exit_code: "numeric problem (non-finite result, overflow, impossible rank)",
    FileError.exit_code: "file-system problem (missing input, refused overwrite, output is an input)",
    UnsupportedError.exit_code: "recognised but unsupported input",
    130: "interrupted by Ctrl-C (SIGINT); nothing was written",
    141: "stdout was closed early (a pipe into `head`)",
    143: "interrupted by SIGTERM; nothing was written",
}
