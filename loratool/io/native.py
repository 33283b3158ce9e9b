"""The native loratool format (spec/FORMAT.md): a strict safetensors file with loratool metadata, holding every
kind loratool has in memory (lora, full; since spec 1.1 dora, loha, lokr, tucker) bit for bit.

Its structure is all in the header (loratool.targets), so `structure` reads nothing else; `load` reads the
factors with pread into numpy arrays. numpy is imported only by `load` and `save`, never by `structure`.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from .. import spec
from ..adapter import Adapter, Target
from ..container import escape, write_file
from ..errors import NumericError, SpecError
from ..validation import Report, check_values, validate_header
from ._common import Dialect, Source, as_source


def canonical_json(obj) -> str:
    """The canonical string encoding of a metadata value (spec section 4.1)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _num(x: float):
    # Integral floats are written as integers so that alpha 16 reads as 16, not 16.0, in every language.
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


# Reader-owned info keys: what a reader derives from the file itself (the LyCORIS factors' shapes, which the
# header holds), never written back, so a file read and written again is the same bytes.
_DERIVED_INFO = ("factor_shapes",)


def target_entry(t: Target) -> dict:
    """The JSON object of one target in loratool.targets (spec section 4.2)."""
    e: dict = {"kind": t.kind, "shape": list(t.shape)}
    if t.kind == "full" or t.kind in spec.FACTORED_KINDS:
        e["scale"] = _num(t.delta_scale)
    if t.kind != "full":
        e["layout"] = t.layout
    if t.kind in ("lora", "dora"):
        e["blocks"] = [{"rank": b.rank, "alpha": _num(b.alpha), "scale_rule": b.scale_rule,
                        "rows": list(b.rows), "cols": list(b.cols)} for b in t.blocks]
    if t.is_dora:
        e["dora_axis"] = t.dora_axis
        e["dora_eps"] = _num(t.dora_eps)
    if t.dtype is not None:
        e["dtype"] = t.dtype
    if t.sha256 is not None:
        e["sha256"] = t.sha256
    info = {k: v for k, v in t.info.items() if k not in _DERIVED_INFO}
    if info:
        e["info"] = info
    return e


def version_of(adapter: Adapter) -> str:
    """The spec version a file of `adapter` declares: the lowest that defines all its kinds and layouts (1.0 for
    plain LoRA and full targets, which 1.0 readers read; 1.1 with DoRA, LyCORIS kinds or fused-expert layouts)."""
    major, minor = spec.version_needed({x for t in adapter for x in (t.kind, t.layout)})
    return f"{major}.{minor}"


def metadata_of(adapter: Adapter) -> dict[str, str]:
    """All __metadata__ strings of an adapter: user keys, then the loratool keys (which win)."""
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(spec.RESERVED_PREFIX)}
    meta[spec.KEY_FORMAT] = spec.FORMAT_MARKER
    meta[spec.KEY_VERSION] = version_of(adapter)
    meta[spec.KEY_TARGETS] = canonical_json({t.key: target_entry(t) for t in adapter})
    if adapter.info:
        meta[spec.KEY_INFO] = canonical_json(dict(adapter.info))
    return meta


def tensors_of(adapter: Adapter) -> dict:
    """name -> tensor, by the naming grammar of spec section 3."""
    out = {}
    for t in adapter:
        if t.magnitude is not None:  # 1-D in the file (rule D002), whatever view a reader kept
            out[spec.magnitude_name(t.key)] = t.magnitude.reshape(-1)
        if t.kind in spec.FACTORED_KINDS:
            out.update({spec.kind_factor_name(t.key, t.kind, k): v for k, v in t.factors.items()})
            continue
        if t.kind == "full":
            out[spec.delta_name(t.key)] = t.delta
            continue
        for i, b in enumerate(t.blocks):
            out[spec.factor_name(t.key, i, "A")] = b.A
            out[spec.factor_name(t.key, i, "B")] = b.B
    return out


def _check_finite(adapter: Adapter, tensors: dict, where: str) -> None:
    bad = [f for f in check_values(tensors, adapter) if f.rule == "T006"]
    if bad:
        raise NumericError(f"{where}: target \"{bad[0].target}\": {bad[0].message}; refusing to write non-finite "
                           "factors", bad)


def numpy_tensors(tensors: dict, where) -> dict:
    """name -> numpy array for name -> numpy array or torch tensor (converted at the edge), each checked to be
    loaded and floating point.

    Raises:
        SpecError: a tensor was never loaded (None) or is not floating point.
    """
    from ..dtypes import as_numpy, dtype_of

    out = {}
    for n, x in tensors.items():
        if x is None:
            raise SpecError(f"{where}: tensor \"{escape(n)}\" was never loaded; load the adapter with its tensors "
                            "first")
        x = as_numpy(x)
        try:
            dt = dtype_of(x)
        except KeyError:
            dt = str(x.dtype)
        if dt not in spec.FLOAT_DTYPES and not dt.startswith("F8_"):
            raise SpecError(f"{where}: tensor \"{escape(n)}\" is {dt}; factors must be floating point")
        out[n] = x
    return out


def save(adapter: Adapter, path, *, overwrite: bool = True) -> int:
    """Write `adapter` to `path` atomically in the native format. Returns the bytes written.

    Factors may be numpy arrays or torch tensors; both are written through numpy (no torch import).
    `overwrite=False` refuses a `path` that exists by the time the file is published (fsutil.atomic_file).

    Raises:
        FileError: `overwrite` is False and `path` exists.
        SpecError: a factor was never loaded or is not floating point.
        NumericError: a factor, delta or alpha is not finite (nothing is written).
        UnsupportedError: a target the spec cannot hold (DoRA on a fused-expert layout, a DoRA magnitude that
            fits no axis, LyCORIS factors whose shapes do not give the target's): the rule it would break.
    """
    tensors = numpy_tensors(tensors_of(adapter), path)
    for t in adapter:
        for b in t.blocks:
            if not math.isfinite(b.alpha):
                raise NumericError(f"{path}: target \"{t.key}\": alpha {b.alpha} is not finite")
        for what, v in (("scale", t.delta_scale), ("dora_eps", t.dora_eps)):
            if not math.isfinite(v):
                raise NumericError(f"{path}: target \"{t.key}\": {what} {v} is not finite")
    meta = metadata_of(adapter)
    _check_header(adapter, tensors, meta, path)
    _check_finite(adapter, tensors, str(path))
    return write_file(path, tensors, meta, overwrite=overwrite)


def _check_header(adapter: Adapter, tensors: dict, meta: dict, path) -> None:
    """The header rules (M, T, D, Y) on the file about to be written, so the writer never writes a file its reader
    refuses.

    Raises:
        UnsupportedError: the first error, with its rule id, and what to do instead.
    """
    from ..container import Header, TensorInfo
    from ..dtypes import dtype_of
    from ..errors import UnsupportedError
    from ..validation import parse_adapter_header

    infos = {n: TensorInfo(n, dtype_of(x), tuple(x.shape), 0, 0) for n, x in tensors.items()}
    _, findings = parse_adapter_header(Header(str(path), 0, 0, tensors=infos, metadata=meta))
    errors = [f for f in findings if f.severity == "error" and f.rule != "C007"]  # C007: numpy_tensors said it
    if errors:
        f = errors[0]
        raise UnsupportedError(f"{path}: {f.message}: spec {version_of(adapter)} cannot hold it (rule {f.rule}); "
                               "write it as kohya (--to kohya), or convert it to LoRA (--rank)", errors)


def report_error(rep: Report) -> SpecError:
    """One SpecError naming the first error and how many there are in all."""
    errs = rep.errors
    first = errs[0]
    where = f"target \"{first.target}\": " if first.target and first.target not in first.message else ""
    more = f" (and {len(errs) - 1} more; run `loratool validate {rep.path}`)" if len(errs) > 1 else ""
    return SpecError(f"{rep.path}: {where}{first.message} (rule {first.rule}){more}", errs)


def _report(src: Source) -> Report:
    """validate_header on the Source's header (parsed once; a header that cannot be parsed raises SpecError
    naming its rule, as report_error would)."""
    return validate_header(src.path, header=src.header())


def structure(path, *, check: bool = True) -> Adapter:
    """The adapter described by a native file's header (every factor None); reads no tensor data, imports
    neither numpy nor torch.

    Args:
        path: the file, or a Source of it.
        check: accepted for symmetry with `load` (the header rules are always checked).
    Raises:
        SpecError: the header breaks an error rule of the spec (container, metadata, names, shapes).
        FileError: the file cannot be read.
    """
    rep = _report(as_source(path))
    if rep.errors:
        raise report_error(rep)
    return rep.adapter


def load(path, *, check: bool = True, lazy: bool = False) -> Adapter:
    """Read a native adapter with its tensors, as numpy arrays (ml_dtypes for BF16/FP8; no torch).

    Args:
        path: the file, or a Source of it.
        check: also refuse non-finite factors (rule T006); off for a summary that counts them instead.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`, checked then)
            instead of reading every tensor now.
    Raises:
        SpecError: the file breaks any error rule of the spec (container, metadata, names, shapes, values).
        FileError: the file cannot be read.
    """
    from ._common import deferred, safetensors_reader

    src = as_source(path)
    rep = _report(src)
    if rep.errors:
        raise report_error(rep)
    adapter = rep.adapter
    read = safetensors_reader(src.path, rep.header)

    def check_tensors(adapter, tensors):
        bad = [f for f in check_values(tensors, adapter) if f.severity == "error"]
        if bad:
            raise report_error(replace(rep, findings=bad))

    if lazy:
        planned = Adapter({t.key: _lazy_factors(t) for t in adapter}, adapter.metadata, adapter.info)
        return deferred(planned, read,
                        (lambda t, tensors: check_tensors(Adapter({t.key: t}), tensors)) if check else None)
    tensors = read(None)
    if check:
        check_tensors(adapter, tensors)
    return attach(adapter, tensors)


def _lazy_factors(t: Target) -> Target:
    """A header-only target with each tensor a Lazy of its name (spec section 3)."""
    from ._common import ref

    return _filled(t, ref)


def _filled(t: Target, get) -> Target:
    """The target with each of its tensors `get(name)`: the delta, the blocks' A and B, the LyCORIS factors, the
    DoRA magnitude."""
    if t.is_dora:
        t = replace(t, magnitude=get(spec.magnitude_name(t.key)))
    if t.kind == "full":
        return replace(t, delta=get(spec.delta_name(t.key)))
    if t.kind in spec.FACTORED_KINDS:
        return replace(t, factors={k: get(spec.kind_factor_name(t.key, t.kind, k)) for k in t.factors})
    return t.with_blocks(replace(b, A=get(spec.factor_name(t.key, i, "A")), B=get(spec.factor_name(t.key, i, "B")))
                         for i, b in enumerate(t.blocks))


def attach(adapter: Adapter, tensors: dict) -> Adapter:
    """Fill a header-only adapter's tensors from name -> tensor."""
    return adapter.replace_targets(_filled(t, tensors.__getitem__) for t in adapter)


def _detect(src: Source) -> int:
    # Any safetensors file may be native: one marked as such surely is; an unmarked one falls back here so
    # the native reader says precisely what is missing (rule M001).
    if not (src.path.suffix == ".safetensors" and src.path.is_file()):
        return 0
    return 100 if spec.KEY_FORMAT in src.header().metadata else 1


DIALECT = Dialect(
    name="loratool", description="loratool's own format (spec/FORMAT.md): one .safetensors file",
    detect=_detect, structure=structure, load=load, options=frozenset({"check"}), reads=(".safetensors",),
    save=save, writes="file", suffix=".safetensors", save_options=frozenset({"overwrite"}),
    kinds=frozenset({"lora", "full", "dora", "loha", "lokr", "tucker"}))  # spec 1.1

__all__ = ["load", "save", "structure", "attach", "metadata_of", "tensors_of", "target_entry", "version_of",
           "canonical_json",
           "numpy_tensors", "DIALECT"]
