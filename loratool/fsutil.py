"""Atomic output and the output-is-not-an-input guard shared by every writer (STYLE.md section 4)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FileError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _resolved(p) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output(out, inputs, overwrite: bool = False) -> Path:
    """Refuse an output that is, contains, lies inside or would replace an input; refuse overwrite unless asked.

    Symlinks are resolved, and hard links to an input are caught with samefile.

    Raises:
        FileError: the output collides with an input or exists without `overwrite`.
    """
    out = Path(out)
    rout = _resolved(out)
    for inp in inputs:
        if inp is None:
            continue
        rin = _resolved(inp)
        same = rout == rin or (out.exists() and Path(inp).exists() and os.path.samefile(out, inp))
        if same or _inside(rin, rout) or (rin.is_dir() and _inside(rout, rin)):
            raise FileError(f"{out}: output would overwrite or sit inside input {inp}; choose another -o path")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileError(f"{out}: already exists; pass --overwrite to replace it")
        if out.is_symlink():
            raise FileError(f"{out}: is a symbolic link; remove it or choose another -o path")
    if not rout.parent.is_dir():
        raise FileError(f"{out}: folder {rout.parent} does not exist; create it first")
    return out


@contextlib.contextmanager
def atomic_file(path, fsync: bool = True):
    """Yield a binary file in the target's folder; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is untouched. `fsync=False` keeps the
    atomic rename but leaves durability to the kernel's writeback, as `cp` does.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False, fsync: bool = True):
    """Yield a temporary folder beside `path`; on success move it into place (replacing an old one if allowed).

    `fsync=False` skips the fsync of the folder's files (see atomic_file)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for child in tmp.iterdir() if fsync else ():
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            if not overwrite:
                raise FileError(f"{path}: already exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
