"""A strict safetensors container: header parsing without torch, pread tensor reads, a deterministic writer.

The reference `safetensors` library tolerates things a LoRA file has no use for (duplicate JSON keys,
leading whitespace); this module refuses them (spec section 2, rules C001-C012) and never trusts an
offset before checking it against the file size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

from . import spec
from .errors import FileError, SpecError, os_error_message


@dataclass(frozen=True)
class Finding:
    """One rule violation (or warning) found in a file."""

    rule: str
    message: str
    target: str | None = None

    @property
    def severity(self) -> str:
        return spec.rule(self.rule).severity

    def as_dict(self) -> dict:
        return {"rule": self.rule, "severity": self.severity, "target": self.target, "message": self.message}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    path: str
    file_size: int
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


class _Duplicate(Exception):
    pass


def _no_dup_object(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise _Duplicate(k)
        seen[k] = v
    return seen


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str):
    """json.loads that refuses duplicate keys (raises _Duplicate) and NaN/Infinity (raises ValueError)."""
    return loads_json(text, object_pairs_hook=_no_dup_object)


MAX_JSON_BYTES = 64 << 20  # a config or index file; a safetensors header has its own limit (rule C002)


def loads_json(text, **hooks):
    """json.loads without NaN/Infinity, where nesting too deep for the parser is a ValueError like any other
    malformed JSON (json raises RecursionError, which would surface as a traceback)."""
    try:
        return json.loads(text, parse_constant=_no_constant, **hooks)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def require_regular(path, what: str = "file") -> None:
    """Refuse an input that is not a regular file (a FIFO or a device would block a read forever).

    Raises:
        FileError: it is missing, a folder, or another kind of file.
    """
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FileError(f"{escape(os.fsdecode(path))}: cannot read: {os_error_message(e)}") from None
    if stat.S_ISDIR(mode):
        raise FileError(f"{escape(os.fsdecode(path))}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise FileError(f"{escape(os.fsdecode(path))}: is not a regular file (a pipe, device or socket); pass the "
                        f"{what} itself")


def read_json_file(path, what: str = "JSON file"):
    """The JSON value of a small regular file (configs, indexes), read with the checks of `require_regular`
    and a size limit.

    Raises:
        FileError: not a readable regular file. SpecError: larger than MAX_JSON_BYTES, not UTF-8 JSON.
    """
    require_regular(path, what)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise FileError(f"{escape(os.fsdecode(path))}: cannot read: {os_error_message(e)}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise SpecError(f"{escape(os.fsdecode(path))}: is larger than {MAX_JSON_BYTES >> 20} MiB; not a {what}")
    try:
        return loads_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SpecError(f"{escape(os.fsdecode(path))}: not valid JSON ({escape(str(e))})") from None


def escape(name: str) -> str:
    """Printable form of a name read from a file: control and non-printable characters escaped."""
    if name.isprintable():
        return name
    return name.encode("unicode_escape").decode("ascii")


def _fatal(path, rule, message) -> SpecError:
    f = Finding(rule, message)
    return SpecError(f"{path}: {message} (rule {rule})", [f])


def read_header(path) -> Header:
    """Parse and check the safetensors header of `path`; collect non-fatal findings in Header.findings.

    Raises:
        FileError: the file cannot be opened.
        SpecError: the header cannot be parsed at all (rules C001-C005).
    """
    path = os.fspath(path)
    require_regular(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _fatal(path, "C001", f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > spec.MAX_HEADER_BYTES:
                raise _fatal(path, "C002", f"header length {n} exceeds the limit of {spec.MAX_HEADER_BYTES} bytes")
            if n > size - 8:
                raise _fatal(path, "C001", f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except IsADirectoryError:
        raise FileError(f"{path}: is a folder, not a safetensors file") from None
    except OSError as e:
        raise FileError(f"{path}: cannot read: {os_error_message(e)}") from None
    return parse_header(path, raw, size)


def parse_header(path: str, raw: bytes, size: int) -> Header:
    """Check the header bytes `raw` of a file of `size` bytes (see read_header)."""
    n = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fatal(path, "C003", f"header is not UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise _fatal(path, "C004", "header does not start with '{' (leading whitespace or garbage)")
    body = text.rstrip(" ")
    try:
        obj = strict_json(body)
    except _Duplicate as e:
        raise _fatal(path, "C005", f"header repeats the key \"{escape(str(e.args[0]))}\"") from None
    except ValueError as e:
        raise _fatal(path, "C003", f"header is not valid JSON ({escape(str(e))})") from None
    if not body.endswith("}"):
        raise _fatal(path, "C004", "header is padded with something other than trailing spaces")
    if not isinstance(obj, dict):
        raise _fatal(path, "C003", "header's top level is not a JSON object")

    hdr = Header(path=path, file_size=size, data_start=8 + n)
    add = hdr.findings.append
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        add(Finding("C011", "__metadata__ is not an object of strings"))
    else:
        hdr.metadata = meta

    data_len = size - hdr.data_start
    for name, entry in obj.items():
        shown = escape(name)
        if not name or not name.isprintable() or name != name.strip():
            add(Finding("C012", f"tensor name \"{shown}\" is empty, has control characters or surrounding whitespace",
                        shown))
        if (not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}
                or not isinstance(entry["dtype"], str)
                or not isinstance(entry["shape"], list)
                or not all(type(d) is int and d >= 0 for d in entry["shape"])
                or not isinstance(entry["data_offsets"], list) or len(entry["data_offsets"]) != 2
                or not all(type(o) is int and o >= 0 for o in entry["data_offsets"])):
            add(Finding("C006", f"tensor \"{shown}\" entry must have exactly dtype, shape and data_offsets", shown))
            continue
        dtype, shape = entry["dtype"], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if dtype not in spec.DTYPE_SIZES:
            add(Finding("C006", f"tensor \"{shown}\" has unknown dtype \"{escape(dtype)}\"", shown))
            continue
        want = math.prod(shape) * spec.DTYPE_SIZES[dtype]
        if end < begin or end - begin != want:
            add(Finding("C008", f"tensor \"{shown}\" spans bytes [{begin}, {end}) but {dtype} {list(shape)} "
                                f"needs {want} bytes", shown))
            continue
        if end > data_len:
            add(Finding("C009", f"tensor \"{shown}\" ends at byte {end}, past the {data_len}-byte data section",
                        shown))
            continue
        hdr.tensors[name] = TensorInfo(name, dtype, shape, begin, end)

    if not any(f.rule in ("C006", "C008", "C009") for f in hdr.findings):
        pos = 0
        for t in sorted(hdr.tensors.values(), key=lambda t: (t.begin, t.end)):
            if t.begin != pos:
                what = "overlaps the previous tensor" if t.begin < pos else f"leaves a gap of {t.begin - pos} bytes"
                add(Finding("C009", f"tensor \"{escape(t.name)}\" starts at byte {t.begin} and {what}",
                            escape(t.name)))
            pos = max(pos, t.end)
        if pos != data_len:
            add(Finding("C009", f"data section is {data_len} bytes but tensors cover {pos}"))
    return hdr


# ---- tensor reads (numpy imported lazily) ----------------------------------------------------------------

def pread_into(fd: int, view: memoryview, offset: int, what: str = "a tensor", where: str = "") -> None:
    """Fill `view` (bytes) from the file at offset; pread may return short reads on large requests."""
    n = len(view)
    got = 0
    while got < n:
        chunk = os.preadv(fd, [view[got:]], offset + got)
        if chunk <= 0:
            raise FileError(f"{where}file ended {n - got} bytes early while reading {what}")
        got += chunk


def pread_exact(fd: int, n: int, offset: int) -> bytearray:
    """Read exactly n bytes at offset into a new buffer."""
    buf = bytearray(n)
    pread_into(fd, memoryview(buf), offset)
    return buf


def read_array(fd: int, data_start: int, info: TensorInfo):
    """Read one tensor with pread into a numpy array this process owns (ml_dtypes for BF16 and FP8; no torch)."""
    from .dtypes import from_buffer

    return from_buffer(pread_exact(fd, info.nbytes, data_start + info.begin), info.dtype, info.shape)


def read_arrays(path, hdr: Header, names=None, fd: int | None = None) -> dict:
    """Tensors of a checked header (all, or those in `names`), name -> numpy array, read with pread (from `fd`
    when given, an open descriptor of `path` the caller closes)."""
    own = fd is None
    if own:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        return {name: read_array(fd, hdr.data_start, info) for name, info in hdr.tensors.items()
                if names is None or name in names}
    finally:
        if own:
            os.close(fd)


# struct formats of the dtypes a one-element tensor is decoded from without numpy (see read_scalars).
_SCALAR_FORMATS = {"F16": "<e", "F32": "<f", "F64": "<d", "I8": "<b", "U8": "<B", "I16": "<h", "U16": "<H",
                   "I32": "<i", "U32": "<I", "I64": "<q", "U64": "<Q", "BOOL": "<?"}


def read_scalars(path, hdr: Header, names) -> dict[str, float]:
    """The value of each named one-element tensor of a checked header, as a Python float, read with pread.

    Plain dtypes are decoded with struct and BF16 as the top half of a float32; only FP8 goes through numpy.
    Measured reason: a kohya file's alphas are the only tensor data a header-level summary needs, and
    importing numpy and ml_dtypes for them costs about 100 ms of a ~250 ms `inspect` on a 2-core machine.

    Raises:
        ValueError: a named tensor does not hold exactly one element.
    """
    out = {}
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        for name in names:
            info = hdr.tensors[name]
            if info.numel != 1:
                raise ValueError(f"{name}: {info.numel} elements, not one")
            raw = bytes(pread_exact(fd, info.nbytes, hdr.data_start + info.begin))
            if info.dtype == "BF16":
                out[name] = struct.unpack("<f", b"\x00\x00" + raw)[0]
            elif info.dtype in _SCALAR_FORMATS:
                out[name] = float(struct.unpack(_SCALAR_FORMATS[info.dtype], raw)[0])
            else:
                out[name] = float(read_array(fd, hdr.data_start, info).astype("float64").reshape(-1)[0])
    finally:
        os.close(fd)
    return out


# ---- writer --------------------------------------------------------------------------------------------

def tensor_bytes(t) -> memoryview:
    """Little-endian bytes of a tensor (numpy, or torch converted at this edge), without a copy when it is
    already contiguous on the CPU."""
    from .dtypes import as_numpy

    import numpy as np

    return memoryview(np.ascontiguousarray(as_numpy(t)).reshape(-1).view(np.uint8))


def build_header(entries: list[tuple[str, str, tuple, int]], metadata: dict[str, str]) -> bytes:
    """Canonical header bytes: sorted keys, compact JSON, padded with spaces to a multiple of 8."""
    obj = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape, nbytes in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return raw


def write_file(path, tensors: dict, metadata: dict[str, str], overwrite: bool = True) -> int:
    """Write tensors (name -> numpy array, ml_dtypes included, or torch tensor) sorted by name, atomically. Returns the
    bytes written."""
    from .fsutil import atomic_file

    from .dtypes import st_name

    def st_dtype(t):
        return st_name(t.dtype)

    names = sorted(tensors)
    blobs = [tensor_bytes(tensors[n]) for n in names]
    entries = [(n, st_dtype(tensors[n]), tuple(tensors[n].shape), len(b)) for n, b in zip(names, blobs)]
    header = build_header(entries, metadata)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for b in blobs:
            f.write(b)
    return 8 + len(header) + sum(len(b) for b in blobs)
