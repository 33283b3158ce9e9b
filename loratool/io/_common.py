"""Helpers shared by the dialect readers and writers: the Dialect unit the registry holds, the Source a
reader reads its structure from, Lazy factors, and base-key resolution.

Every reader builds its adapter once, from headers and configs alone, with each factor a `Lazy` (which
tensors, and which view of them); `structure` leaves those as None and never reads tensor data, `load`
reads the named tensors (numpy arrays, ml_dtypes for BF16/FP8) and builds them, and `load(lazy=True)` (`deferred`)
gives the structure with a loader on each target that reads its tensors when the caller asks (merge, one
target at a time).

Every foreign reader sorts each key of its input into one of: understood (becomes part of a target), recognised
and refused (UnsupportedError), or unknown. Unknown keys are an error that lists them unless the caller
passes `allow_unknown=True`; then they are recorded in `Adapter.info["unknown_keys"]`, never dropped
without a trace.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .. import spec
from ..container import Finding, Header, escape, read_header
from ..errors import FileError, MismatchError, NumericError, SpecError, UnsupportedError, os_error_message

MAX_LISTED = 5  # keys named in one error message; the rest are counted


@dataclass(frozen=True)
class Dialect:
    """One on-disk dialect, as the registry (io/registry.py) holds it.

    Attributes:
        name: what `--to` and `detect` call it.
        description: one line for help texts and messages.
        detect: Source -> confidence (0: not this dialect; the highest wins, ties go to registry order).
        structure: (path or Source, **options) -> Adapter with every factor None, from headers and configs.
        load: (path or Source, **options) -> Adapter with numpy factors.
        options: the keyword options `structure` and `load` take.
        reads: the file suffixes it reads (a folder reader lists none).
        save: (adapter, path, **save_options) -> bytes written, or None when loratool does not write it.
        writes: "file" or "folder", what `save` writes.
        suffix: the suffix of the file `save` writes ("file" only).
        save_options: the keyword options `save` takes besides the adapter and the path.
        holds: Target -> whether `save` writes this lora target as it is; None: every one. A dialect that
            holds one A/B pair per module (PEFT, kohya) says no to several blocks, and the tasks that write
            (tasks/convert.py) fold such a target into one exact pair first (ops/fold.py).
        structure_options: keyword options only `structure` takes ("partial": describe what the file alone
            says where `load` would refuse for want of a config or an option, the unknowns named in info).
        kinds: the target kinds (adapter.Target.kind; "dora" for any DoRA target) `save` writes, each checked
            further by the writer; the tasks that write refuse the others before anything is written.
    """

    name: str
    description: str
    detect: Callable[["Source"], int]
    structure: Callable[..., Any]
    load: Callable[..., Any]
    options: frozenset = frozenset()
    reads: tuple[str, ...] = ()
    save: Callable[..., int] | None = None
    writes: str | None = None
    suffix: str | None = None
    save_options: frozenset = frozenset()
    holds: Callable[[Any], bool] | None = None
    structure_options: frozenset = frozenset()
    kinds: frozenset = frozenset({"lora", "full"})

    def write(self, adapter, path, **options) -> int:
        """`save(adapter, path)` with the options it takes (others, meant for other writers, are dropped).

        Raises:
            UnsupportedError: loratool does not write this dialect.
        """
        if self.save is None:
            from ..errors import UnsupportedError

            raise UnsupportedError(f"{path}: loratool reads {self.name} adapters but does not write them")
        return self.save(adapter, path, **{k: v for k, v in options.items() if k in self.save_options})


def listing(keys, limit: int = MAX_LISTED) -> str:
    """"a", "b", "c" (and 4 more): a short, escaped list of names for a one-line message."""
    keys = sorted(keys)
    shown = ", ".join(f"\"{escape(k)}\"" for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


# The rule (spec.VALIDATE_RULES) of keys a dialect's reader does not understand, by the dialect's registry name.
UNKNOWN_RULES = {"peft": "P010", "kohya": "K001", "loralib": "L008"}


def check_unknown(path, dialect: str, unknown, allow_unknown: bool, info: dict) -> None:
    """Raise on keys the reader did not understand, or record them in `info` when they are allowed.

    Raises:
        SpecError: there are unknown keys and `allow_unknown` is False.
    """
    unknown = sorted(set(unknown))
    if not unknown:
        return
    if not allow_unknown:
        raise refusal(SpecError, UNKNOWN_RULES[dialect.lower()],
                      f"{path}: {len(unknown)} key(s) that are not {dialect} LoRA factors: {listing(unknown)}; pass "
                      "--allow-unknown (allow_unknown=True) to ignore them")
    info["unknown_keys"] = unknown


def fits(build: Callable[[], Any], allow_partial: bool, skipped: list):
    """`build()`, or None when it raises MismatchError (a module that maps to no base key, or does not fit
    it) and `allow_partial` is set: the message is appended to `skipped`, which the reader keeps in
    Adapter.info["skipped"] so that every skipped module is reported, never dropped without a trace.

    Raises:
        MismatchError: as `build`, when `allow_partial` is off.
    """
    try:
        return build()
    except MismatchError as e:
        if not allow_partial:
            raise
        skipped.append(str(e))
        return None


# ---- refusals that `validate` reports as findings ----------------------------------------------------------

REFUSALS = (SpecError, MismatchError, UnsupportedError, NumericError)  # what a reader refuses an input with


def refusal(cls, rule: str, message: str, target: str | None = None):
    """`cls(message)` carrying its rule id (spec.RULES or spec.VALIDATE_RULES) as a Finding on `target` (a
    module or key, escaped here): the one check serves both the refusal and `validate`'s report."""
    return cls(message, [Finding(rule, message, None if target is None else escape(target))])


def attempt(refused: list, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, or None with its refusal appended to `refused`: one module refused, the others still
    read, so that every refusal is reported together (`settle`)."""
    try:
        return fn(*args, **kwargs)
    except REFUSALS as e:
        refused.append(e)
        return None


def settle(where, refused: list, problems: list | None, what: str = "modules") -> None:
    """The per-module refusals of one reading: appended to `problems` when the caller collects them (`validate`:
    the refused modules are left out of the adapter, the rest is read), else raised as one error that names every
    one of them (the first one's class; a fix shared by all is said once).

    Raises:
        SpecError, MismatchError, UnsupportedError, NumericError: some module was refused and `problems` is None.
    """
    if not refused:
        return
    if problems is not None:
        problems.extend(refused)
        return
    if len(refused) == 1:
        raise refused[0]
    prefix = f"{where}: "
    parts = [str(e).removeprefix(prefix) for e in refused]
    fixes = {p.rpartition("; ")[2] for p in parts}
    tail = ""
    if len(fixes) == 1 and all("; " in p for p in parts):
        tail = "; " + fixes.pop()
        parts = [p.rpartition("; ")[0] for p in parts]
    raise type(refused[0])(f"{prefix}{len(refused)} {what} are refused: " + "; ".join(parts) + tail,
                           [f for e in refused for f in e.findings])


def read_torch(path) -> dict:
    """A flat state dict from a torch file, loaded with weights_only=True and nothing else (torch tensors).

    Raises:
        SpecError: the file is not a weights-only dict of tensors keyed by strings.
        FileError: the file cannot be read.
    """
    from .base import TorchBase

    return dict(TorchBase(path)._sd)


# ---- the structure of a file, and its tensors on demand --------------------------------------------------

class Source:
    """An adapter path as the readers see it, with the safetensors header of the file holding its tensors
    read at most once (detection, structure and a summary share it).

    Attributes:
        path: the path given (a file or a PEFT folder).
        tensor_header: the header of the safetensors file holding the tensors, once a reader has read it.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.tensor_header: Header | None = None
        self._headers: dict[Path, Header] = {}

    def header(self, file=None) -> Header:
        """The header of `file` (default: the path itself), parsed once; container findings are kept in it.

        Raises:
            FileError, SpecError: as container.read_header.
        """
        f = self.path if file is None else Path(file)
        if f not in self._headers:
            self._headers[f] = read_header(f)
        self.tensor_header = self._headers[f]
        return self.tensor_header

    def checked_header(self, file=None) -> Header:
        """`header`, refused on its first container error (rule C0xx named in the message).

        Raises:
            SpecError: the container breaks a C rule.
        """
        hdr = self.header(file)
        if hdr.errors:
            first = hdr.errors[0]
            raise SpecError(f"{hdr.path}: {first.message} (rule {first.rule})", hdr.errors)
        return hdr


def as_source(path) -> Source:
    """`path` as a Source (a Source is returned as it is); a Hugging Face Hub id (`org/name`, not a local path)
    is the snapshot of that PEFT adapter in the Hub cache (io.hub.resolve)."""
    if isinstance(path, Source):
        return path
    from .hub import resolve

    return Source(resolve(path, "adapter"))


@dataclass(frozen=True)
class Meta:
    """What a reader knows of a tensor before reading it: name, safetensors dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return is_float_name(self.dtype)


def is_float_name(dtype: str) -> bool:
    """Whether a safetensors dtype name is a floating-point type (FP8 included, as torch counts it)."""
    return dtype in spec.FLOAT_DTYPES or dtype.startswith("F8_")


def lazy_whole_target(key: str, layout: str, shape, rank: int, A, B, alpha: float, scale_rule: str = "standard",
                      **kw):
    """adapter.whole_target for factors not read yet (the rank comes from the header, not from A)."""
    from ..adapter import Block, Target, matrix_shape

    shape = tuple(int(s) for s in shape)
    out, inp = matrix_shape(layout, shape)
    block = Block(rank=int(rank), alpha=float(alpha), scale_rule=scale_rule, rows=(0, out), cols=(0, inp), A=A, B=B)
    return Target(key=key, layout=layout, shape=shape, blocks=(block,), **kw)


def metas_of_header(hdr: Header) -> dict[str, Meta]:
    """name -> Meta of every tensor of a checked safetensors header."""
    return {n: Meta(n, t.dtype, tuple(t.shape)) for n, t in hdr.tensors.items()}


def metas_of_state_dict(sd: dict) -> dict[str, Meta]:
    """name -> Meta of every torch tensor of a state dict (dtypes without a safetensors name, such as complex,
    keep torch's name and are not floating point here)."""
    from ..dtypes import st_name

    out = {}
    for n, t in sd.items():
        try:
            dt = st_name(t.dtype)
        except KeyError:
            dt = str(t.dtype).removeprefix("torch.")
        out[n] = Meta(n, dt, tuple(int(d) for d in t.shape))
    return out


@dataclass(frozen=True)
class Lazy:
    """A factor or delta not read yet: `make(arrays)` builds it from the named tensors of the file.

    Readers build an adapter whose factors are Lazy from headers and configs alone; `header_only` turns it
    into the structure (factors None), `materialize` into the loaded adapter.
    """

    names: tuple[str, ...]
    make: Callable[[dict], Any]


def ref(name: str, view: Callable | None = None) -> Lazy:
    """The tensor `name` itself, or `view(tensor)` (a reshape or a slice: numpy views, no copy)."""
    return Lazy((name,), (lambda arrays: arrays[name]) if view is None else (lambda arrays: view(arrays[name])))


def _lazies(adapter):
    return (x for x in adapter.arrays() if isinstance(x, Lazy))


def header_only(adapter):
    """The adapter with every Lazy factor or delta left as None: its structure."""
    return adapter.map_arrays(lambda x: None if isinstance(x, Lazy) else x)


def materialize(adapter, read: Callable[[set], dict]):
    """The adapter with every Lazy built from the tensors `read(names)` returns (name -> numpy array); the
    tensors are read in one call, each once."""
    names = {n for z in _lazies(adapter) for n in z.names}
    arrays = read(names) if names else {}
    return adapter.map_arrays(lambda x: x.make(arrays) if isinstance(x, Lazy) else x)


def deferred(adapter, read: Callable[[set], dict], check: Callable | None = None):
    """The adapter's structure (every Lazy factor None) with, on each target, a loader (`Target.loaded`) that
    reads that target's tensors with `read(names)` and builds its factors when called, each time anew; nothing
    is kept, so a caller that drops a loaded target frees its factors.

    Args:
        check: (loaded target, name -> array) -> None, raising on factors the reader refuses (native's T006),
            run on each load.
    """
    def loader(planned):
        names = {n for z in planned.arrays() if isinstance(z, Lazy) for n in z.names}

        def load(_target):
            arrays = read(names) if names else {}
            t = planned.map_arrays(lambda x: x.make(arrays) if isinstance(x, Lazy) else x)
            if check is not None:
                check(t, arrays)
            return t

        return load

    return adapter.replace_targets(replace(t.map_arrays(lambda x: None if isinstance(x, Lazy) else x),
                                           load=loader(t)) for t in adapter)


def safetensors_reader(path, hdr: Header) -> Callable[[set], dict]:
    """read(names) -> name -> numpy array, with pread from a checked header (no torch).

    The file is pinned when the reader is made (device, inode, size, modification time): a read of a file
    written, truncated or replaced since then is refused, so tensors read at different times (a deferred
    load reads each target when it is merged) all come from the file the header describes.

    Raises (from read):
        FileError: the file changed since the reader was made, or cannot be read.
    """
    from ..container import read_arrays
    from .base import _check_pin, _identity

    try:
        pin = _identity(os.stat(path))
    except OSError as e:
        raise FileError(f"{escape(os.fsdecode(path))}: cannot read: {os_error_message(e)}") from None
    if pin[2] != hdr.file_size:  # it changed between the header's read and now: refused with _check_pin's message
        _check_pin(path, (*pin[:2], hdr.file_size, pin[3]), os.stat(path))

    def read(names):
        fd = _open_pinned(path, pin)
        try:
            arrays = read_arrays(path, hdr, names, fd=fd)
            _check_pin(path, pin, os.fstat(fd))  # a write during the read shows in the mtime
            return arrays
        finally:
            os.close(fd)

    return read


def _open_pinned(path, pin: tuple) -> int:
    from .base import _check_pin

    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError as e:
        raise FileError(f"{escape(os.fsdecode(path))}: cannot read: {os_error_message(e)}") from None
    try:
        _check_pin(path, pin, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def torch_reader(sd: dict) -> Callable[[set], dict]:
    """read(names) -> name -> numpy array, converted from the torch tensors of a loaded state dict."""
    from ..dtypes import from_torch

    return lambda names: {n: from_torch(sd[n]) for n in names}


def finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class BaseKeys:
    """Resolve the keys a dialect derives (PEFT module paths, kohya underscore names) to a base's keys.

    Shapes come from the base's headers; no tensor is read unless `read` is called.
    """

    def __init__(self, base):
        from .base import is_reader, open_base

        self._own = not is_reader(base)
        self.base = open_base(base) if self._own else base
        self.keys = set(self.base.keys())
        self._underscored: dict[str, list[str]] | None = None

    def close(self):
        if self._own:
            self.base.close()

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.base.info(key)
        return None if info is None else tuple(info[0])

    def read(self, key: str):
        """The base tensor as a numpy array (pread for a safetensors base: no torch)."""
        from ..dtypes import from_buffer, from_torch

        b = self.base
        if hasattr(b, "shard_of"):
            b = b.shard_of(key)
        if hasattr(b, "raw"):
            info = b.header.tensors[key]
            return from_buffer(b.raw(key), info.dtype, info.shape)
        a = b.read(key)  # io.base readers give numpy; a torch tensor from any other reader is converted
        return from_torch(a) if hasattr(a, "detach") else a

    def resolve_dotted(self, key: str, where: str, target: str | None = None) -> str:
        """The base key for a dotted key: itself, or the one base key that differs from it only by a leading
        prefix on either side (a model saved with or without its `model.` wrapper, for example). `target` names
        the adapter's module in the refusal's finding (default: the key).

        Raises:
            MismatchError: no base key, or more than one, fits.
        """
        if key in self.keys:
            return key
        hits = sorted(k for k in self.keys if k.endswith("." + key) or key.endswith("." + k))
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise refusal(MismatchError, "B001", f"{where}: \"{escape(key)}\" is not in the base {self.base.path} "
                          "(under any prefix); check that --base is the model this adapter was trained on",
                          target or key)
        raise refusal(MismatchError, "F002", f"{where}: \"{escape(key)}\" fits several base keys ({listing(hits)}); "
                      "pass a base with only the model this adapter belongs to", target or key)

    def resolve_underscored(self, name: str, where: str, target: str | None = None) -> str:
        """The base key `<module>.weight` whose module path, with "." replaced by "_", is `name` or ends
        with "_" + `name` (kohya names drop the dots and any wrapper prefix). `target` names the adapter's module
        in the refusal's finding (default: `name`).

        Raises:
            MismatchError: no base key, or more than one, fits.
        """
        if self._underscored is None:
            self._underscored = {}
            for k in self.keys:
                if k.endswith(".weight"):
                    self._underscored.setdefault(k[: -len(".weight")].replace(".", "_"), []).append(k)
        exact = self._underscored.get(name, [])
        hits = exact or sorted(k for u, ks in self._underscored.items() if u.endswith("_" + name) for k in ks)
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise refusal(MismatchError, "B001", f"{where}: no base key of {self.base.path} matches the kohya name "
                          f"\"{escape(name)}\" (dots written as underscores); check that --base is the model this "
                          "adapter was trained on", target or name)
        raise refusal(MismatchError, "F002", f"{where}: kohya name \"{escape(name)}\" fits several base keys "
                      f"({listing(hits)}); underscores make them ambiguous, so pass a base holding only the model it "
                      "belongs to", target or name)


@contextlib.contextmanager
def base_keys(base):
    """A BaseKeys for `base` (path or io.base.BaseModel), or None without one; closes what it opened."""
    if base is None:
        yield None
        return
    bk = BaseKeys(base)
    try:
        yield bk
    finally:
        bk.close()


def require_dir_or_file(path) -> Path:
    """`path` as a Path; FileError when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise FileError(f"{p}: no such file or folder")
    return p
