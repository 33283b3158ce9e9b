"""Atomic output and the output-is-not-an-input guard shared by every writer (STYLE.md section 4).

Interruption (STYLE.md section 8): a KeyboardInterrupt (or the CLI's SIGTERM exception, a subclass) may arrive
between any two bytecodes. Before an output is moved into place it removes the temporary file or folder; the
removal itself runs to the end even when a further interrupt arrives meanwhile. From the first rename that
makes an output visible, `published()` counts it, so that the CLI holds later interrupts instead of reporting
"nothing was written" about a file that exists.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import threading
from pathlib import Path

from .errors import FileError

_lock = threading.Lock()
_published = 0  # outputs moved into place (or being moved) by this process
_open_dirs: set[Path] = set()  # temporary folders of atomic_dir not yet moved into place


def published() -> int:
    """How many outputs atomic_file and atomic_dir have started to move into place in this process.

    The count rises just before the first rename that makes an output visible (a rename inside a temporary
    folder of atomic_dir is not one), and falls back if that rename fails. The CLI compares it before and
    after a command: once it has risen, an interrupt arrives too late to leave nothing written.
    """
    return _published


def _count(n: int) -> None:
    global _published
    with _lock:
        _published += n


def _finish(cleanup, *args) -> None:
    """Run a clean-up to its end even if interrupts arrive meanwhile; the last one is raised afterwards."""
    pending = None
    while True:
        try:
            cleanup(*args)
            break
        except KeyboardInterrupt as e:  # cleanups here are idempotent: run again from the start
            pending = e
    if pending is not None:
        raise pending


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _visible(path: Path) -> bool:
    """Whether a rename to `path` publishes an output (not one inside a temporary folder of atomic_dir)."""
    rp = _resolved(path.parent)
    with _lock:
        return not any(_inside(rp, d) for d in _open_dirs)


def _resolved(p) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


@contextlib.contextmanager
def os_errors(path=None, writes: bool = True):
    """Turn an OSError the file system raises in the block (disk full, no permission, read-only, a name too long)
    into one FileError line: the path and what the errno means (errors.os_error_message).

    Clean-ups inside the block run first (atomic_file and atomic_dir remove their temporary output as the
    exception passes), so by the time the FileError is raised nothing is left. A broken pipe (EPIPE) passes
    through: it is the reader of stdout going away, which the CLI handles.

    Args:
        path: the path the block reads or writes, named when the OSError does not name one (os.write and
            fsync never do) or names a temporary name beside it.
        writes: the block writes an output: the message ends with "nothing was written".
    Raises:
        FileError: for any OSError but EPIPE.
    """
    import errno

    from .errors import os_error_message

    try:
        yield
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        where = _shown_path(e.filename, path)
        raise FileError(f"{where + ': ' if where else ''}{os_error_message(e)}"
                        f"{'; nothing was written' if writes else ''}") from None


def _shown_path(filename, path) -> str:
    """The OSError's file name, unless it is a temporary name (or inside one): then the output's path. (Control
    characters are escaped where the message is printed: cli.render.)"""
    if filename is not None and not isinstance(filename, int):
        name = os.fsdecode(filename)
        if not any(_TEMP_NAME.match(part) for part in Path(name).parts) or path is None:
            return name
    return "" if path is None else os.fsdecode(path)


def maps_os_errors(arg: str = "output", writes: bool = True):
    """Decorator: the function's OSErrors become FileErrors (`os_errors`), naming the argument `arg`.

    One line on each task function (merge, extract, convert, rescale, combine write; inspect and validate
    read) gives every command the same mapping; the CLI's own mapping of OSError stays as the last net.
    """
    import functools

    def wrap(fn):
        code = fn.__code__  # the argument's position, without importing `inspect` (inspect's start-up time)
        position = code.co_varnames[:code.co_argcount].index(arg) if arg in code.co_varnames[:code.co_argcount] \
            else None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            path = kwargs.get(arg, args[position] if position is not None and position < len(args) else None)
            with os_errors(path if isinstance(path, (str, os.PathLike)) else None, writes=writes):
                return fn(*args, **kwargs)

        return call

    return wrap


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


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)-[0-9a-f]{12}\.(?:tmp|old)$", re.S)
_stale: list[Path] = []  # temporaries of dead processes removed by this one (take_stale_removed)


def take_stale_removed() -> list[Path]:
    """The temporary outputs of processes that died before cleaning up (a SIGKILL, a power cut), found beside
    an output this process wrote and removed since the last call (the list is emptied)."""
    with _lock:
        taken = list(_stale)
        _stale.clear()
    return taken


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporaries a dead process left beside `path` (their names carry its process id)."""
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["name"] != path.name or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        with _lock:
            _stale.append(Path(entry.path))


def _create(path: Path, suffix: str, make) -> Path:
    """A new hidden name beside `path` (".<name>.<pid>-<random><suffix>"), made with `make(name)`.

    The name is chosen before the file exists and stored by the caller before `make` runs, so that an
    interrupt arriving just after the creation still finds the name to remove (tempfile.mkstemp returns it
    only afterwards). The process id in the name lets a later run remove what this one leaves if it is
    killed outright (SIGKILL, no chance to clean up): `_remove_stale`, called here first."""
    _remove_stale(path)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}-{os.urandom(6).hex()}{suffix}"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path, fsync: bool = True, overwrite: bool = True):
    """Yield a binary file in the target's folder; on success fsync it and rename it over `path`.

    On any exception, interrupts included, the temporary file is removed and `path` is untouched.
    `fsync=False` keeps the atomic rename but leaves durability to the kernel's writeback, as `cp` does.
    `overwrite=False` never replaces a `path` that appeared meanwhile (another writer's): the file is published
    with a hard link, which fails when the name exists, instead of a rename, which would replace it.

    Raises:
        FileError: `overwrite` is False and `path` appeared while the file was written.
    """
    path = Path(path)
    names: list[Path] = []  # the temporary file's name, known before it exists
    fds: list[int] = []
    counted = 0

    def make(tmp):
        names[:] = [tmp]
        try:
            fds.append(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))  # open()'s mode, umask applied
        except FileExistsError:  # not ours: never remove it
            names.clear()
            raise

    try:
        tmp = _create(path, ".tmp", make)
        with os.fdopen(fds.pop(), "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if _visible(path):  # counted before the rename: an interrupt from here on finds the output published
            _count(1)
            counted = 1
        if overwrite or not _publish_new(tmp, path):
            os.replace(tmp, path)
    except BaseException:
        if counted:
            _count(-1)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        _finish(_unlink, *names)
        raise


def _publish_new(tmp: Path, path: Path) -> bool:
    """Give the finished file `tmp` the name `path` only if no file has it (a hard link, then the temporary name
    removed); False where the file system has no hard links (the caller renames instead).

    Raises:
        FileError: `path` exists (it appeared after the command checked it).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileError(f"{path}: appeared while this command was writing it (another writer?); nothing was "
                        "written; pass --overwrite to replace it") from None
    except OSError:  # EPERM, ENOTSUP, EXDEV: no hard links here
        return False
    os.unlink(tmp)
    return True


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False, fsync: bool = True):
    """Yield a temporary folder beside `path`; on success move it into place (replacing an old one if allowed).

    On any exception, interrupts included, the temporary folder is removed and `path` is as it was (an old
    folder moved aside is moved back). `fsync=False` skips the fsync of the folder's files (see atomic_file).
    `overwrite=False` never replaces anything that appeared at `path` meanwhile, an empty folder included
    (`_publish_new_dir`).

    Raises:
        FileError: `path` exists (without `overwrite`), or appeared while the folder was written.
    """
    path = Path(path)
    names: list[Path] = []  # [temporary folder, folder holding the old output], each known before it exists
    claim: list[int] = []  # the inode of the temporary folder once `path` is claimed (_publish_new_dir)
    counted = 0

    def make(d):
        names.append(d)
        try:
            os.mkdir(d, 0o777)  # the mode mkdir gives, umask applied
        except FileExistsError:  # not ours: never remove it
            names.pop()
            raise
        if len(names) == 1:
            with _lock:
                _open_dirs.add(_resolved(d))

    try:
        tmp = _create(path, ".tmp", make)
        yield tmp
        for child in tmp.iterdir() if fsync else ():
            if child.is_file():
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        if _visible(path):  # counted before the first rename: the two below are not cut apart by an interrupt
            _count(1)
            counted = 1
        if not overwrite:
            _publish_new_dir(tmp, path, claim)
        else:
            if path.exists():
                old = _create(path, ".old", make)
                os.replace(path, old / "x")
            os.replace(tmp, path)
    except BaseException:
        if counted:
            _count(-1)
        _finish(_undo, path, names, claim)
        raise
    finally:
        if names:
            with _lock:
                _open_dirs.discard(_resolved(names[0]))
    if len(names) > 1:
        shutil.rmtree(names[1], ignore_errors=True)


def _publish_new_dir(tmp: Path, path: Path, claim: list[int]) -> None:
    """Give the finished folder `tmp` the name `path` only if nothing has it.

    A rename cannot do this alone: POSIX rename() replaces an empty folder, and the call that refuses to
    (renameat2 with RENAME_NOREPLACE) is Linux-only and not in Python's os module. So the name is claimed first
    with mkdir, which fails when anything exists there, and the finished folder is then renamed over the
    claim, the empty folder this process just made. What a reader can see at `path` is nothing, then an empty
    folder for the two system calls between the mkdir and the rename, then the whole output: never a part of
    it. A writer that puts anything into the claim meanwhile makes the rename fail (ENOTEMPTY), and its files
    stay. On Windows, rename never replaces a folder, so it is used alone.

    Raises:
        FileError: something is at `path` (it appeared after the command checked it).
    """
    def appeared():
        return FileError(f"{path}: appeared while this command was writing it (another writer?); nothing was "
                         "written; pass --overwrite to replace it")

    if os.name == "nt":
        try:
            os.rename(tmp, path)
        except FileExistsError:
            raise appeared() from None
        return
    claim.append(os.lstat(tmp).st_ino)  # before the mkdir: an interrupt after it finds the claim to remove
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        claim.clear()  # not ours: never remove it
        raise appeared() from None
    try:
        os.rename(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise appeared() from None
        raise


def _undo(path: Path, names: list[Path], claim: list[int] | None = None) -> None:
    """Remove a temporary folder (names[0]); put back an old output moved aside for it (into names[1]); remove
    the empty folder `_publish_new_dir` claimed `path` with, unless the output was renamed onto it (an
    rmdir never removes a folder that is not empty: another writer's files stay)."""
    if claim:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if st.st_ino != claim[0] and stat.S_ISDIR(st.st_mode):
                os.rmdir(path)
        claim.clear()
    if len(names) > 1:
        if (names[1] / "x").exists() and not path.exists():
            os.replace(names[1] / "x", path)
        shutil.rmtree(names[1], ignore_errors=True)
    if names:
        shutil.rmtree(names[0], ignore_errors=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def copy_model_files(src: Path, dst: Path, skip: set[str]) -> list[str]:
    """Copy a model folder's other files (config, tokenizer, ...) into `dst` as plain files and folders.

    A file is copied only if it resolves inside `src`, or, for a Hugging Face cache snapshot
    (`.../snapshots/<revision>/`), inside that repository's own `blobs/`; links are followed to their data and
    copied as regular files. Anything else is skipped and named in the returned list (with the reason):
    links that lead outside, links to folders (which could loop), pipes, devices, sockets, and weight files
    that are not the base's (`original/consolidated.00.pth`: a copy the merge would leave stale). Names in
    `skip` (the base's own weights and index, at the top level) and hidden names are left out silently.
    """
    root = _resolved(src)
    allowed = [root]
    if src.parent.name == "snapshots" and (src.parent.parent / "blobs").is_dir():
        allowed.append(_resolved(src.parent.parent / "blobs"))
    skipped: list[str] = []

    def walk(folder: Path, out: Path, rel: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = entry.name
            where = f"{rel}{name}"
            if name.startswith(".") or (not rel and name in skip):
                continue
            real = _resolved(entry.path)
            if not any(_inside(real, r) for r in allowed):
                skipped.append(f"{where} (a link that leads outside the model folder)")
                continue
            try:
                mode = os.stat(real).st_mode
            except OSError:
                skipped.append(f"{where} (a broken link)")
                continue
            if stat.S_ISDIR(mode):
                if entry.is_symlink():
                    skipped.append(f"{where} (a link to a folder)")
                    continue
                (out / name).mkdir()
                walk(Path(entry.path), out / name, f"{where}/")
            elif not stat.S_ISREG(mode):
                skipped.append(f"{where} (not a regular file)")
            elif name.endswith(WEIGHT_SUFFIXES):
                skipped.append(f"{where} (weights that are not the base's: the merged model would carry them stale)")
            else:
                shutil.copyfile(real, out / name)

    walk(src, dst, "")
    return skipped
