"""The native loratool format (spec/FORMAT.md): a strict safetensors file with loratool metadata.

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


def target_entry(t: Target) -> dict:
    """The JSON object of one target in loratool.targets."""
    e: dict = {"kind": t.kind, "shape": list(t.shape)}
    if t.kind == "full":
        e["scale"] = _num(t.delta_scale)
    else:
        e["layout"] = t.layout
        out, inp = t.matrix_shape
        e["blocks"] = [{"rank": b.rank, "alpha": _num(b.alpha), "scale_rule": b.scale_rule,
                        "rows": list(b.rows), "cols": list(b.cols)} for b in t.blocks]
    if t.dtype is not None:
        e["dtype"] = t.dtype
    if t.sha256 is not None:
        e["sha256"] = t.sha256
    if t.info:
        e["info"] = dict(t.info)
    return e


def metadata_of(adapter: Adapter) -> dict[str, str]:
    """All __metadata__ strings of an adapter: user keys, then the loratool keys (which win)."""
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(spec.RESERVED_PREFIX)}
    meta[spec.KEY_FORMAT] = spec.FORMAT_MARKER
    meta[spec.KEY_VERSION] = spec.SPEC_VERSION_STR
    meta[spec.KEY_TARGETS] = canonical_json({t.key: target_entry(t) for t in adapter})
    if adapter.info:
        meta[spec.KEY_INFO] = canonical_json(dict(adapter.info))
    return meta


def tensors_of(adapter: Adapter) -> dict:
    """name -> tensor, by the naming grammar of spec section 3."""
    out = {}
    for t in adapter:
        if t.magnitude is not None:
            out[spec.magnitude_name(t.key)] = t.magnitude
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
        UnsupportedError: a target of a kind the spec does not define (LyCORIS LoHa/LoKr/Tucker, DoRA).
    """
    for t in adapter:
        if t.kind not in spec.KINDS or t.is_dora:
            from ..errors import UnsupportedError

            raise UnsupportedError(f"{path}: target \"{escape(t.key)}\" is {t.kind}"
                                   f"{' with DoRA' if t.magnitude is not None and t.kind != 'dora' else ''}, a kind "
                                   f"spec {spec.SPEC_VERSION_STR} does not define; write it as kohya (--to kohya), or "
                                   "convert it to LoRA (--rank)")
    tensors = numpy_tensors(tensors_of(adapter), path)
    for t in adapter:
        for b in t.blocks:
            if not math.isfinite(b.alpha):
                raise NumericError(f"{path}: target \"{t.key}\": alpha {b.alpha} is not finite")
    _check_finite(adapter, tensors, str(path))
    return write_file(path, tensors, metadata_of(adapter), overwrite=overwrite)


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
    """A header-only target with each factor (or delta) a Lazy of its tensor name (spec section 3)."""
    from ._common import ref

    if t.kind == "full":
        return replace(t, delta=ref(spec.delta_name(t.key)))
    return t.with_blocks(replace(b, A=ref(spec.factor_name(t.key, i, "A")), B=ref(spec.factor_name(t.key, i, "B")))
                         for i, b in enumerate(t.blocks))


def attach(adapter: Adapter, tensors: dict) -> Adapter:
    """Fill a header-only adapter's factors from name -> tensor."""
    targets = []
    for t in adapter:
        if t.kind == "full":
            targets.append(replace(t, delta=tensors[spec.delta_name(t.key)]))
            continue
        blocks = [replace(b, A=tensors[spec.factor_name(t.key, i, "A")], B=tensors[spec.factor_name(t.key, i, "B")])
                  for i, b in enumerate(t.blocks)]
        targets.append(t.with_blocks(blocks))
    return adapter.replace_targets(targets)


def _detect(src: Source) -> int:
    # Any safetensors file may be native: one marked as such surely is; an unmarked one falls back here so
    # the native reader says precisely what is missing (rule M001).
    if not (src.path.suffix == ".safetensors" and src.path.is_file()):
        return 0
    return 100 if spec.KEY_FORMAT in src.header().metadata else 1


DIALECT = Dialect(
    name="loratool", description="loratool's own format (spec/FORMAT.md): one .safetensors file",
    detect=_detect, structure=structure, load=load, options=frozenset({"check"}), reads=(".safetensors",),
    save=save, writes="file", suffix=".safetensors", save_options=frozenset({"overwrite"}))

__all__ = ["load", "save", "structure", "attach", "metadata_of", "tensors_of", "target_entry", "canonical_json",
           "numpy_tensors", "DIALECT"]
