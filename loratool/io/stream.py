"""Streaming rewrites of base models: read, transform and write one tensor (one row block) at a time.

A base is a .safetensors file, a Hugging Face folder (sharded with model.safetensors.index.json, a single
model.safetensors, or pytorch_model.bin) or a torch .pt/.pth/.bin state dict (weights_only=True, no
fallback). The output keeps the base's format and sharding unless its name says otherwise. When no
tensor of a safetensors file changes dtype, the output file reuses the input's header bytes verbatim, so
every tensor keeps its offset: tensors nobody transforms are copied as raw bytes inside the kernel
(copy_file_range), never decoded, and transformed tensors are written in place with pwrite.

Transformed tensors are read through a mapping of each tensor's bytes alone, held while it is transformed
(a mapped shard would count every touched page in the RSS); untouched ones are copied inside the kernel.
Transforms are duck-typed objects with `block_rows` and `block(V, r0) -> array` (see ops.merge.Merger; an optional
`row_view` (rows, cols) says how the transform cuts the tensor, the row view otherwise) that
take numpy row blocks of the source (ml_dtypes for BF16) and return numpy rows of the output dtype: io never
imports ops. torch is imported only when a torch file is read or written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import spec
from ..adapter import row_spans
from ..container import Header, TensorInfo, build_header, escape
from ..errors import FileError, SpecError, os_error_message
from ..fsutil import atomic_dir, atomic_file, check_output
from .. import dtypes
from .base import INDEX_NAME, TORCH_SUFFIXES, ShardedBase, SafetensorsBase, TorchBase, open_base

COPY_CHUNK = 64 << 20  # bytes per copy_file_range call: lets a cancel or a progress update in between
FLOAT_DTYPES = spec.FLOAT_DTYPES


# ---- inputs ---------------------------------------------------------------------------------------------

@dataclass
class SourceFile:
    """One safetensors file of a base, with its header bytes verbatim and an open descriptor."""

    path: Path
    name: str  # file name inside the base folder (shard name), or the file's own name
    header: Header
    raw_header: bytes  # 8-byte length + JSON header, exactly as in the file
    fd: int

    @classmethod
    def open(cls, sb: SafetensorsBase) -> "SourceFile":
        fd = os.open(sb.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, sb.header.data_start, 0)
        except OSError as e:
            os.close(fd)
            raise FileError(f"{sb.path}: cannot read: {os_error_message(e)}") from None
        return cls(sb.path, sb.path.name, sb.header, raw, fd)


class StreamBase:
    """A base model opened for streaming: headers parsed (no torch for safetensors), descriptors open.

    Attributes:
        kind: "safetensors" (one file or folder with model.safetensors), "sharded" or "torch".
        folder: the base folder when the base was given as one (its other files are copied), else None.
        files: the safetensors files in data order (empty for a torch base).
    """

    def __init__(self, path):
        from .hub import resolve

        self.path = Path(resolve(path, "base"))  # a Hub id is its snapshot folder, whose other files are copied
        self.folder = self.path if self.path.is_dir() else None
        reader = open_base(self.path)  # validates headers, index, shard names; raises SpecError/FileError
        self._reader = reader
        self.files: list[SourceFile] = []
        self.index = None
        self.torch_base: TorchBase | None = None
        self._where: dict[str, tuple[SourceFile, TensorInfo]] = {}
        try:
            if isinstance(reader, ShardedBase):
                self.kind = "sharded"
                self.index = reader.index
                for name, sb in reader.shards.items():
                    self.files.append(SourceFile.open(sb))
                by_name = {f.name: f for f in self.files}
                for key, name in reader.index["weight_map"].items():
                    self._where[key] = (by_name[name], by_name[name].header.tensors[key])
                # A tensor held by two shards would be merged in one and copied stale from the other: refuse.
                for f in self.files:
                    for key in f.header.tensors:
                        if key in self._where and self._where[key][0] is not f:
                            raise SpecError(f"{self.path / reader.index_name}: \"{escape(key)}\" is in shard {escape(f.name)}"
                                            " but the index does not map it there; fix the index")
            elif isinstance(reader, SafetensorsBase):
                self.kind = "safetensors"
                f = SourceFile.open(reader)
                self.files.append(f)
                self._where = {k: (f, t) for k, t in f.header.tensors.items()}
            else:
                self.kind = "torch"
                self.torch_base = reader
        except BaseException:
            self.close()
            raise

    @property
    def reader(self):
        """The io.base reader of this base (for adapter readers that resolve names against a base)."""
        return self._reader

    @property
    def inputs(self) -> list[Path]:
        """Every path this base reads, for the output-is-not-an-input guard."""
        return [self.path, *self._reader.files]

    def keys(self) -> list[str]:
        if self.torch_base is not None:
            return self.torch_base.keys()
        return list(self._where)

    def info(self, key: str):
        """(shape, safetensors dtype name) or None."""
        if self.torch_base is not None:
            return self.torch_base.info(key)
        w = self._where.get(key)
        return None if w is None else (w[1].shape, w[1].dtype)

    def read(self, key: str):
        """The whole tensor as torch (for fingerprints and small in-memory work)."""
        return self._reader.read(key)

    def sha256(self, key: str) -> str:
        return self._reader.sha256(key)

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files = []
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_stream(path) -> StreamBase:
    """Open a base for streaming (see StreamBase). Raises FileError or SpecError for unreadable bases."""
    return StreamBase(path)


def output_format(base: StreamBase, out) -> str:
    """"safetensors" or "torch" for a single file, "folder" for a folder.

    The one place a model output's format is chosen: a name ending in .safetensors or .pt/.pth/.bin chooses
    that format; a name ending in "/", or an existing folder, is a folder (holding `model.safetensors`, or the
    base folder's files and sharding); any other name without a suffix keeps the base's kind.

    Raises:
        UsageError: the name has a suffix this writer cannot write (.gguf, .ckpt, ...).
    """
    from ..errors import UsageError

    text = os.fspath(out)
    p = Path(text)
    if text.endswith(("/", os.sep)) or p.is_dir():
        return "folder"
    if p.suffix == ".safetensors":
        return "safetensors"
    if p.suffix in TORCH_SUFFIXES:
        return "torch"
    if p.suffix:
        raise UsageError(f"{text}: a model is written as .safetensors, .pt/.pth/.bin or a folder, not as "
                         f"{escape(p.suffix)}; choose one of those names")
    if base.folder is not None:
        return "folder"
    return "torch" if base.kind == "torch" else "safetensors"


# ---- output layout --------------------------------------------------------------------------------------

@dataclass
class Entry:
    """One output tensor: where its bytes come from and where they go."""

    key: str
    dtype: str  # output dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute offset in the output file
    src: tuple[SourceFile, TensorInfo] | None = None  # safetensors source
    src_dtype: str = ""
    src_key: str = ""  # the base key the bytes come from, when it is not `key` (a tied head written untied)
    computed: bool = False  # no source bytes: its transform makes the rows (a quantized weight dequantized);
    # src_key then names the base tensor whose shard holds it

    @property
    def source_key(self) -> str:
        return self.src_key or self.key

    @property
    def rows_cols(self) -> tuple[int, int]:
        return (1, 1) if not self.shape else (self.shape[0], math.prod(self.shape[1:]))


def _view(e: Entry, tf) -> tuple[int, int]:
    """The rows the transform cuts the tensor in: its `row_view` when it has one (ops.merge.Merger of a fused
    expert tensor: (E·d1, d2)), else the entry's row view."""
    return getattr(tf, "row_view", None) or e.rows_cols


@dataclass
class OutFile:
    name: str  # relative to the output folder, or "" for a single-file output
    header: bytes  # 8-byte length + JSON
    entries: list[Entry] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)


def _layout(name: str, entries: list[Entry], metadata: dict, raw_header: bytes | None) -> OutFile:
    """Offsets for `entries`: the source's `raw_header` and offsets when no entry changes dtype, else a new header."""
    if raw_header is not None and all(e.dtype == e.src_dtype and not e.src_key and not e.computed for e in entries):
        base = len(raw_header)
        for e in entries:
            e.offset = base + e.src[1].begin
        return OutFile(name, raw_header, entries)
    body = build_header([(e.key, e.dtype, e.shape, e.nbytes) for e in entries], metadata)
    header = struct.pack("<Q", len(body)) + body
    pos = len(header)
    for e in entries:
        e.offset = pos
        pos += e.nbytes
    return OutFile(name, header, entries)


def _check_sources(base: StreamBase, sources: Mapping[str, str]) -> None:
    for key, src in sources.items():
        if base.info(key) is not None or base.info(src) is None:
            raise ValueError(f"output tensor {key!r} from {src!r}: the key must be new and its source in the base")


@dataclass(frozen=True)
class Computed:
    """An output tensor with no source bytes, made whole by its transform (a quantized weight written
    dequantized): its shape and dtype, and the base key whose shard (file) holds it."""

    shape: tuple[int, ...]
    dtype: str
    near: str


def _check_computed(base: StreamBase, computed: Mapping[str, Computed], drop: frozenset) -> None:
    for key, c in computed.items():
        if (base.info(key) is not None and key not in drop) or base.info(c.near) is None:
            raise ValueError(f"computed tensor {key!r}: the key must be new (or dropped) and {c.near!r} in the base")


def _computed_entry(key: str, c: Computed) -> Entry:
    return Entry(key, c.dtype, tuple(c.shape), math.prod(c.shape) * spec.DTYPE_SIZES[c.dtype], src_key=c.near,
                 computed=True)


def plan_files(base: StreamBase, fmt: str, out_dtype: Callable[[str, str], str],
               sources: Mapping[str, str] | None = None, drop: frozenset = frozenset(),
               computed: Mapping[str, Computed] | None = None) -> list[OutFile]:
    """The safetensors files to write (names relative to the output), with every tensor's offset.

    Args:
        out_dtype: (key, base dtype) -> output dtype.
        sources: extra output keys -> the base key each is read from; written after the tensors of the file
            (shard) that holds its source.
        drop: base keys not written (the scales of float8 weights written dequantized).
        computed: output keys made by their transforms (Computed), written after the tensors of the file that
            holds their `near` key.
    """
    sources = dict(sources or {})
    computed = dict(computed or {})
    _check_sources(base, sources)
    _check_computed(base, computed, drop)

    def entry(key, f, t, src_key=""):
        dt = out_dtype(key, t.dtype)
        return Entry(key, dt, t.shape, t.numel * spec.DTYPE_SIZES[dt], src=(f, t), src_dtype=t.dtype,
                     src_key=src_key)

    if base.kind == "torch":
        entries = []
        for key, src_key in [(k, "") for k in base.keys() if k not in drop] + sorted(sources.items()):
            shape, dt = base.info(src_key or key)
            odt = out_dtype(key, dt)
            entries.append(Entry(key, odt, tuple(shape), math.prod(shape) * spec.DTYPE_SIZES[odt], src_dtype=dt,
                                 src_key=src_key))
        entries += [_computed_entry(k, c) for k, c in sorted(computed.items())]
        return [_layout("model.safetensors" if fmt == "folder" else "", entries, {"format": "pt"}, None)]
    per_file = []
    for f in base.files:
        ents = [entry(k, f, t) for k, t in sorted(f.header.tensors.items(), key=lambda kv: kv[1].begin)
                if k not in drop]
        dropped = len(ents) < len(f.header.tensors)
        ents += [entry(k, f, f.header.tensors[s], s) for k, s in sorted(sources.items()) if s in f.header.tensors]
        ents += [_computed_entry(k, c) for k, c in sorted(computed.items()) if c.near in f.header.tensors]
        per_file.append((f, ents, dropped))
    if fmt == "folder" or len(per_file) == 1:
        # A single-file base written as a folder holds model.safetensors, as Hugging Face names it.
        # A file that loses keys gets a new header: its own lists them.
        return [_layout(("model.safetensors" if base.folder is None else f.name) if fmt == "folder" else "", ents,
                        f.header.metadata, None if dropped else f.raw_header) for f, ents, dropped in per_file]
    meta = {}
    for f, _, _ in per_file:
        meta.update(f.header.metadata)
    return [_layout("", [e for _, ents, _ in per_file for e in ents], meta, None)]


# ---- low-level writes -----------------------------------------------------------------------------------

def start_writeback(fd: int, offset: int, n: int) -> None:
    """Ask the kernel to start writing [offset, offset + n) to disk now, without waiting, so the final fsync
    waits for little and disk writes overlap the arithmetic. On Linux, POSIX_FADV_DONTNEED starts the
    writeback of the range's dirty pages and lets their clean copies go once written: the output is never
    read back, and a model larger than the page cache does not push the inputs out of it. Elsewhere a no-op."""
    if n > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_range(src: int, src_off: int, dst: int, dst_off: int, n: int, cancel=None) -> None:
    """Copy n bytes between descriptors inside the kernel when it can (copy_file_range), else pread/pwrite."""
    use_kernel = hasattr(os, "copy_file_range")
    while n > 0:
        if cancel is not None and cancel.is_set():
            return
        k = min(n, COPY_CHUNK)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(src, dst, k, src_off, dst_off)
            except OSError:
                use_kernel = False
        if not use_kernel:
            buf = os.pread(src, k, src_off)
            pwrite_all(dst, buf, dst_off)
            done = len(buf)
        if done <= 0:
            raise FileError("a base file ended early while copying; is it being modified?")
        src_off, dst_off, n = src_off + done, dst_off + done, n - done


TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _update_config(config: Path, dtype: str | None, updates: Mapping[str, Any], dequantized: bool = False) -> None:
    """Name `dtype` in a Hugging Face config.json's dtype fields (those it has; torch_dtype when none), set
    `updates` (at the top level, and in a multimodal `text_config` that holds the key too), and drop its
    quantization_config when the weights were written `dequantized`."""
    from ..container import read_json_file

    if not config.is_file():
        return
    cfg = read_json_file(config, "config.json")
    if not isinstance(cfg, dict):
        return
    if dtype is not None:
        for k in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[k] = TORCH_DTYPE_NAMES[dtype]
    for k, v in updates.items():
        cfg[k] = v
        if isinstance(cfg.get("text_config"), dict) and k in cfg["text_config"]:
            cfg["text_config"][k] = v
    if dequantized:
        cfg.pop("quantization_config", None)
    config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---- the rewriter ---------------------------------------------------------------------------------------

def _join(thread: threading.Thread) -> None:
    """Join a thread that has been told to stop, to its end even if interrupts arrive meanwhile (its files are
    removed next); the last interrupt is raised afterwards."""
    pending = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as e:
            pending = e
    if pending is not None:
        raise pending


def _placeholder(n: int) -> np.ndarray:
    """What a computed tensor's transform is handed for n rows: an (n, 0) array, its row count alone."""
    return np.empty((n, 0), np.float32)


class _Cast:
    """The transform of a tensor that only changes dtype (under --dtype): rounded once, nearest even.

    Raises (from block): NumericError when a finite value overflows the new dtype (naming the tensor).
    """

    def __init__(self, entry: Entry, block_bytes: int = 1 << 22):
        self.key, self.dst = entry.key, entry.dtype
        rows, cols = entry.rows_cols
        self.block_rows = max(1, min(rows, block_bytes // max(1, cols * 4)))

    def block(self, V, r0):
        if dtypes.is_float(self.dst) and dtypes.is_float(dtypes.dtype_of(V)):
            big = dtypes.out_of_range(V, self.dst)
            if big is not None and not math.isnan(big):
                from ..errors import NumericError

                raise NumericError(f"tensor \"{escape(self.key)}\": value {big:.6g} overflows {self.dst}; choose "
                                   "a wider --dtype")
        return dtypes.cast(V, self.dst)


class Rewriter:
    """Write a transformed copy of a base to `out`, atomically; nothing appears at `out` unless commit() runs.

    Usage:
        with Rewriter(base, out, fmt, out_dtype=...) as rw:
            stats = rw.run(transforms, progress)   # key -> transform; others copied raw (or cast)
            rw.commit()
    Leaving the block without commit() removes every temporary file.
    """

    def __init__(self, base: StreamBase, out, fmt: str, *, out_dtype: Callable[[str, str], str] | None = None,
                 overwrite: bool = False, fsync: bool = True, workers: int | None = None,
                 drop: frozenset = frozenset(), computed: Mapping[str, Computed] | None = None):
        self.base, self.out, self.fmt = base, Path(out), fmt
        self.drop = frozenset(drop)  # base keys not written (plan_files)
        self.computed = dict(computed or {})  # output keys made by their transforms (plan_files)
        self.out_dtype = out_dtype or (lambda key, dt: dt)
        self.overwrite, self.fsync = overwrite, fsync
        self.skipped_files: list[str] = []  # the base folder's files not copied, with the reason (commit)
        self._digests: dict[str, Any] = {}  # key -> hashlib object fed the source bytes (run's digests)
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._stack = contextlib.ExitStack()
        self._committed = False
        self._copier: threading.Thread | None = None
        self._state: dict[str, str] = {}  # key -> "copying" | "copied" | "claimed" (by a transform)
        self._cv = threading.Condition()
        self._copy_error: BaseException | None = None
        self._cancel = threading.Event()
        self._early: Callable[[str], bool] = lambda key: False
        self.bytes_written = 0
        self.sources: dict[str, str] = {}  # extra output key -> the base key it is read from (add_sources)
        if fmt == "torch" or (fmt == "folder" and base.kind == "torch"):
            self.files = []
            self._torch_out = True
            if fmt == "folder":
                self._tmpdir = Path(self._stack.enter_context(atomic_dir(self.out, overwrite, fsync=fsync)))
            return
        self._torch_out = False
        self.files = plan_files(base, fmt, self.out_dtype, drop=self.drop, computed=self.computed)
        try:
            self._open()
        except BaseException as exc:  # discard what _open made (a plain close() would commit it)
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            raise

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data the output will hold."""
        if self.files:
            return sum(e.nbytes for of in self.files for e in of.entries)
        keys = [(k, k) for k in self.base.keys() if k not in self.drop] + list(self.sources.items())
        return (sum(math.prod(self.base.info(s)[0]) * spec.DTYPE_SIZES[self.out_dtype(k, self.base.info(s)[1])]
                    for k, s in keys)
                + sum(math.prod(c.shape) * spec.DTYPE_SIZES[c.dtype] for c in self.computed.values()))

    def add_sources(self, sources: Mapping[str, str]) -> None:
        """Also write each new key of `sources`, read from the base key it names (a tied head written untied);
        call before run(). The output's headers are laid out again; a background copy already under way (its
        offsets are stale) is stopped and starts over in run().

        Raises:
            ValueError: a key is in the base already, or a source is not.
        """
        sources = {k: v for k, v in sources.items() if self.sources.get(k) != v}
        if not sources:
            return
        _check_sources(self.base, sources)
        self.sources.update(sources)
        if self._torch_out:
            return
        if self._copier is not None:
            self._cancel.set()
            _join(self._copier)
            if self._copy_error is not None:
                raise self._copy_error
            self._copier, self._copy_error, self._state = None, None, {}
            self._cancel = threading.Event()
        self.files = plan_files(self.base, self.fmt, self.out_dtype, self.sources, self.drop, self.computed)
        for of in self.files:
            fd = self._fds[of.name]
            os.ftruncate(fd, 0)  # drops pages copied at the old offsets
            os.ftruncate(fd, of.size)
            pwrite_all(fd, of.header, 0)

    # -- output files
    def _open(self):
        if self.fmt == "folder":
            self._tmpdir = Path(self._stack.enter_context(atomic_dir(self.out, self.overwrite, fsync=self.fsync)))
            self._fds = {}
            for of in self.files:
                fd = os.open(self._tmpdir / of.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._stack.callback(os.close, fd)
                self._fds[of.name] = fd
        else:
            if self.out.exists() and self.overwrite and self.out.is_dir():
                raise FileError(f"{self.out}: is a folder; choose a file name ending in .safetensors")
            fobj = self._stack.enter_context(atomic_file(self.out, fsync=self.fsync, overwrite=self.overwrite))
            self._fds = {"": fobj.fileno()}
        for of in self.files:
            fd = self._fds[of.name]
            os.ftruncate(fd, of.size)
            pwrite_all(fd, of.header, 0)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._copier is not None:  # stop the background copy before its files are removed
                self._cancel.set()
                _join(self._copier)
        finally:  # even when an interrupt cut the join short: the temporary output goes
            if not self._committed and exc_type is None:
                exc_type = RuntimeError  # leaving without commit: discard the output
                try:
                    raise RuntimeError("not committed")
                except RuntimeError as e:
                    exc = e
            self._stack.__exit__(exc_type, exc, exc.__traceback__ if exc is not None else None)
        return False

    # -- the work
    def start_copy(self, early: Callable[[str], bool] | None = None) -> None:
        """Start copying raw tensors in the background, before the transforms are known.

        Call it while torch imports and adapters load: the kernel copies on an otherwise idle core. Tensors
        for which `early(key)` is true (the caller's guess that nothing transforms them) are copied first,
        then the others, until run() claims the transformed ones. Copying a tensor that is transformed
        later is not wasted: its transform then overwrites page-cache pages that already exist, which costs
        the kernel about half as much as filling new ones. Leaving without commit() cancels the copy.
        """
        if self._torch_out or self._copier is not None:
            return
        self._early = early or (lambda key: False)
        self._copier = threading.Thread(target=self._copy_all, name="loratool-copy", daemon=True)
        self._copier.start()

    def _copy_all(self) -> None:
        try:
            for phase in ("early", "rest"):
                for of in self.files:
                    fd = self._fds[of.name]
                    for e in of.entries:
                        if self._cancel.is_set():
                            return
                        if e.src is None or e.dtype != e.src_dtype or (phase == "early" and not self._early(e.key)):
                            continue
                        with self._cv:
                            if e.key in self._state:  # claimed by a transform, or copied already
                                continue
                            self._state[e.key] = "copying"
                        f, t = e.src
                        try:
                            copy_range(f.fd, f.header.data_start + t.begin, fd, e.offset, e.nbytes, self._cancel)
                        finally:
                            with self._cv:
                                self._state[e.key] = "copied"
                                self._cv.notify_all()
        except BaseException as exc:  # surfaced by run()
            self._copy_error = exc

    def _claim(self, key: str) -> None:
        """Make sure the copier is not writing `key` and never will (it may already have copied it)."""
        with self._cv:
            while self._state.get(key) == "copying":
                self._cv.wait()
            self._state.setdefault(key, "claimed")

    def run(self, transforms: Mapping[str, Any], progress: Callable[..., None] | None = None,
            digests: Mapping[str, Any] | None = None) -> dict:
        """Write every tensor: transformed ones through their transform, the rest raw (or cast).

        Args:
            digests: key -> a hashlib object, for transformed keys: fed the source tensor's bytes as they are
                read for the transform (the bytes the output is made of, with no second pass over them).
        Returns:
            {"bytes": bytes written, "tensors": count, "transformed": count}.
        """
        progress = progress or (lambda *a, **k: None)
        self._digests = dict(digests or {})
        if self._torch_out:
            return self._run_torch(transforms, progress)
        jobs_tf, raw = [], []
        for of in self.files:
            fd = self._fds[of.name]
            for e in of.entries:
                tf = transforms.get(e.key)
                if tf is None and e.computed:
                    raise ValueError(f"computed tensor {e.key!r} has no transform")
                if tf is None and e.dtype != e.src_dtype:
                    tf = _Cast(e)
                if tf is not None or e.src is None:
                    jobs_tf.append((fd, e, tf))  # tf None: a torch source, written from the tensor's bytes
                else:
                    raw.append((fd, e))
        with self._cv:  # the copier skips every tensor a transform will write
            for _, e, _ in jobs_tf:
                self._state.setdefault(e.key, "claimed")
        self.start_copy()  # no-op when already started
        # Biggest first keeps the workers evenly loaded at the end.
        jobs_tf.sort(key=lambda j: -j[1].nbytes)
        lock = threading.Lock()

        def done(n):
            with lock:
                self.bytes_written += n
            progress(n)

        def do_tf(job):
            fd, e, tf = job
            self._claim(e.key)
            self._transform(fd, e, tf, done)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = []
            try:
                futures.extend(pool.submit(do_tf, j) for j in jobs_tf)
                for fu in futures:
                    fu.result()
            except BaseException:  # an error or an interrupt: running jobs stop at their next row block
                self._cancel.set()
                for fu in futures:
                    fu.cancel()
                raise
        self._copier.join()
        if self._copy_error is not None:
            raise self._copy_error
        for fd, e in raw:
            if self.fsync:
                start_writeback(fd, e.offset, e.nbytes)
            done(e.nbytes)
        self.bytes_written += sum(len(of.header) for of in self.files)
        return {"bytes": self.bytes_written, "tensors": sum(len(of.entries) for of in self.files),
                "transformed": len([j for j in jobs_tf if j[2] is not None])}

    def _transform(self, fd: int, e: Entry, tf, done) -> None:
        rows, cols = _view(e, tf)
        osize = spec.DTYPE_SIZES[e.dtype]
        if e.nbytes == 0:
            return  # a zero-element tensor has no bytes to write
        if e.computed:  # the transform reads what it needs
            self._blocks(fd, e, tf, None, osize, done)
            return
        if e.src is None:  # torch base: the tensor is memory-mapped by torch.load, seen here through numpy
            W = self.base.read(e.source_key).reshape(rows, cols)
            if tf is None:
                pwrite_all(fd, np.ascontiguousarray(W).reshape(-1).view(np.uint8), e.offset)
                done(e.nbytes)
                return
            self._blocks(fd, e, tf, W, osize, done)
            return
        # The tensor over the page cache (io.base's mapping of its bytes alone): no read copy, unmapped right after.
        with self.base.reader.mapped(e.source_key) as flat:
            self._blocks(fd, e, tf, flat.reshape(rows, cols), osize, done)
            del flat  # every view of the mapping must be gone before it closes

    def _blocks(self, fd, e: Entry, tf, W, osize: int, done) -> None:
        rows, cols = _view(e, tf)
        digest = self._digests.get(e.key)
        for r0, r1 in row_spans(rows, tf.block_rows):
            if self._cancel.is_set():  # the run failed or was interrupted: the output is discarded
                return
            V = W[r0:r1] if W is not None else _placeholder(r1 - r0)
            if digest is not None and W is not None:  # rows in order: the tensor's little-endian bytes, as read
                digest.update(np.ascontiguousarray(V).reshape(-1).view(np.uint8))
            data = np.ascontiguousarray(tf.block(V, r0)).reshape(-1).view(np.uint8)
            off = e.offset + r0 * cols * osize
            pwrite_all(fd, data, off)
            if self.fsync:
                start_writeback(fd, off, len(data))
            done(len(data))

    def _run_torch(self, transforms, progress) -> dict:
        """A .pt output: torch.save needs the whole dict, so merged tensors are held in memory here."""
        import torch

        state = {}
        for key, c in sorted(self.computed.items()):
            tf, rows = transforms[key], (c.shape[0] if c.shape else 1)
            W = np.concatenate([tf.block(_placeholder(b - a), a).copy() for a, b in row_spans(rows, tf.block_rows)])
            state[key] = dtypes.to_torch(W.reshape(c.shape))
            progress(W.nbytes)
        for key, src in [(k, k) for k in self.base.keys() if k not in self.drop] + sorted(self.sources.items()):
            W = self.base.read(src)
            tf = transforms.get(key)
            dt = self.base.info(src)[1]
            odt = self.out_dtype(key, dt)
            if tf is None and odt != dt:
                tf = _Cast(Entry(key, odt, tuple(W.shape), 0))
            if tf is not None:
                rows = getattr(tf, "row_view", None)
                rows = rows[0] if rows else 1 if W.ndim == 0 else W.shape[0]
                V = W.reshape(rows, -1)
                if key in self._digests:
                    self._digests[key].update(np.ascontiguousarray(V).reshape(-1).view(np.uint8))
                W = np.concatenate([tf.block(V[a:b], a).copy() for a, b in row_spans(rows, tf.block_rows)])
                W = W.reshape(tuple(self.base.info(src)[0]))
            state[key] = dtypes.to_torch(W)
            progress(W.nbytes)
        if self.fmt == "folder":  # a torch base's folder keeps its file's name
            tb = self.base.torch_base
            dest = self._tmpdir / (tb.path.name if self.base.folder is not None and tb is not None
                                   else "pytorch_model.bin")
        else:  # a .pt name for a folder base of any kind
            dest = self.out
        fobj = self._stack.enter_context(atomic_file(dest, fsync=self.fsync,
                                                     overwrite=self.overwrite or self.fmt == "folder"))
        torch.save(state, fobj)
        fobj.flush()
        self.bytes_written = os.fstat(fobj.fileno()).st_size
        return {"bytes": self.bytes_written, "tensors": len(state), "transformed": len(transforms)}

    def commit(self, config_dtype: str | None = None, config_updates: Mapping[str, Any] | None = None,
               dequantized: bool = False) -> None:
        """Copy the base folder's other files, write the index, and move the output into place.

        Args:
            config_dtype: the dtype every floating-point tensor was written in (`--dtype`), which a copied
                `config.json` then names (`torch_dtype`, and transformers 5's `dtype`), so that transformers
                loads the model in it; None leaves the config as it is.
            config_updates: keys to set in a copied `config.json` (e.g. `tie_word_embeddings: false`).
            dequantized: the quantized weights were written dequantized: a copied `config.json` loses its
                `quantization_config`.
        """
        if self.fmt == "folder" and self.base.folder is not None:
            self._copy_folder_files()
            if config_dtype is not None or config_updates or dequantized:
                _update_config(self._tmpdir / "config.json", config_dtype, config_updates or {}, dequantized)
        self._committed = True
        self._stack.close()

    def _copy_folder_files(self) -> None:
        from ..fsutil import copy_model_files

        index_name = self.base.reader.index_name if self.base.kind == "sharded" else INDEX_NAME
        weights = {f.path.name for f in self.base.files} | {index_name}
        if self.base.kind == "torch":
            weights.add(self.base.torch_base.path.name)
        self.skipped_files = copy_model_files(self.base.folder, self._tmpdir, weights)
        if self.base.kind == "sharded":
            index = json.loads(json.dumps(self.base.index))
            if self.drop and isinstance(index.get("weight_map"), dict):
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in self.drop}
            for of in self.files:  # the extra tensors (add_sources) are in the shard of their source
                for e in of.entries:
                    if e.src_key:
                        index["weight_map"][e.key] = of.name
            total = sum(e.nbytes for of in self.files for e in of.entries)
            if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
                index["metadata"]["total_size"] = total
            (self._tmpdir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                   encoding="utf-8")


__all__ = ["StreamBase", "open_stream", "output_format", "plan_files", "Rewriter", "Computed", "copy_range",
           "start_writeback", "check_output", "FLOAT_DTYPES"]
