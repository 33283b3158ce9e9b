"""Library entry points behind `validate`, `inspect` and `convert`: plain data in, plain data out, no printing."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from .adapter import Adapter
from .validation import Report, check_base, check_values, validate_header


def validate_file(path, base=None, read_data: bool = True) -> Report:
    """Every rule of the spec on a native adapter file; with `base`, rules B001-B004 too.

    Args:
        path: the adapter file.
        base: a base model path (file or folder) or an opened io.base.BaseModel, or None.
        read_data: also read the factors for rules T006 and W003 (numpy, one tensor at a time; no torch).
    Returns:
        A Report; `report.errors` is empty when the file is valid.
    """
    rep = validate_header(path)
    if rep.adapter is None or rep.errors:
        return rep
    if read_data:
        from .container import read_array

        class _OnDemand:
            """name -> tensor read when asked: validation holds one tensor at a time, whatever the file size."""

            def __init__(self, fd, header):
                self.fd, self.header = fd, header

            def get(self, name):
                info = self.header.tensors.get(name)
                return None if info is None else read_array(self.fd, self.header.data_start, info)

        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            rep.findings += check_values(_OnDemand(fd, rep.header), rep.adapter)
        finally:
            os.close(fd)
    if base is not None:
        from .io.base import BaseModel, open_base

        b = base if isinstance(base, BaseModel) else open_base(base)
        try:
            rep.findings += check_base(rep.adapter, b)
        finally:
            if b is not base:
                b.close()
    return rep


def summary(adapter: Adapter, header=None) -> dict:
    """Header-level summary of an adapter (factors not needed): counts, ranks, alphas, scales, dtypes."""
    ranks, alphas, scales, layouts = Counter(), Counter(), Counter(), Counter()
    dtypes = Counter()
    rows = []
    for t in adapter:
        layouts[t.layout] += 1
        for b in t.blocks:
            alphas[b.alpha] += 1
            scales[round(b.scale, 12)] += 1
        ranks[t.rank] += 1
        row = {
            "target": t.key, "kind": t.kind, "layout": t.layout, "shape": list(t.shape), "rank": t.rank,
            "blocks": [{"rank": b.rank, "alpha": b.alpha, "scale": b.scale, "scale_rule": b.scale_rule,
                        "rows": list(b.rows), "cols": list(b.cols)} for b in t.blocks],
        }
        if t.kind == "full":
            row["scale"] = t.delta_scale
        if t.dtype or t.sha256:
            row["fingerprint"] = {"dtype": t.dtype, "sha256": t.sha256}
        if t.info:
            row["info"] = dict(t.info)
        rows.append(row)
    out = {
        "targets": len(adapter),
        "parameters": adapter.n_params,
        "rank_histogram": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {repr(k): v for k, v in sorted(alphas.items())},
        "scales": {repr(k): v for k, v in sorted(scales.items())},
        "layouts": dict(sorted(layouts.items())),
        "fingerprint": {
            "dtypes": sum(1 for t in adapter if t.dtype),
            "sha256": sum(1 for t in adapter if t.sha256),
        },
        "metadata": dict(adapter.metadata),
        "info": dict(adapter.info),
        "per_target": rows,
    }
    if header is not None:
        for info in header.tensors.values():
            dtypes[info.dtype] += 1
        out["dtypes"] = dict(sorted(dtypes.items()))
        out["bytes"] = header.file_size
    return out


def inspect(path, *, stats: bool = False, dialect: str | None = None, **options) -> dict:
    """A summary of an adapter of any dialect, from its structure: for a native file, a PEFT folder with
    adapter_model.safetensors or a kohya file, the headers and configs alone (no tensor data, no torch).

    Args:
        path: an adapter file or a PEFT folder.
        stats: also read the factors and add per target "stats": ||ΔW||_F, the ranks keeping 90% and 99% of
            the energy, and the count of non-finite values (counted, not refused).
        dialect: force a dialect instead of detecting it.
        options: reader options (base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out); one that is set
            and that the dialect does not take is refused.
    Returns:
        A dict: path, dialect, format and spec_version (of a native file, else None), unknown_keys (foreign
        dialects), the fields of `summary` (dtypes and bytes when the tensors sit in a safetensors file), and
        a "stats" entry in every per_target row when asked.
    Raises:
        SpecError, FileError, MismatchError, UnsupportedError: as the dialect's reader says.
    """
    from . import spec
    from .io import registry

    src = registry.Source(path)
    d = registry.get(dialect) if dialect else registry.detect(src)
    if stats:  # a native reader refuses non-finite factors unless told to leave them to be counted
        adapter = registry.load(src, dialect=d, **options, check=False)
    else:
        adapter = registry.structure(src, dialect=d, **options)
    hdr = src.tensor_header
    fmt = hdr.metadata.get(spec.KEY_FORMAT) if hdr is not None else None
    doc = {"path": str(path), "dialect": d.name, "format": fmt,
           "spec_version": hdr.metadata.get(spec.KEY_VERSION) if fmt is not None else None}
    if fmt is None:
        doc["unknown_keys"] = list(adapter.info.get("unknown_keys", []))
    doc.update(summary(adapter, hdr))
    if stats:
        st = target_stats(adapter)
        for row in doc["per_target"]:
            row["stats"] = st[row["target"]]
    return doc


def target_stats(adapter: Adapter) -> dict[str, dict]:
    """Per target ||ΔW||_F, ranks for 90% and 99% of the energy and non-finite counts, from the factors.

    Factors may be numpy arrays or torch tensors; the linear algebra is ops.linalg's (factored, never out x in).
    """
    import numpy as np

    from .dtypes import as_f32, to_torch
    from .io._common import numpy_factors
    from .ops.linalg import energy_rank, frobenius_norm, singular_values

    out = {}
    for t in numpy_factors(adapter):
        tensors = [t.delta] if t.kind == "full" else [x for b in t.blocks for x in (b.A, b.B)]
        nonfinite = sum(int((~np.isfinite(as_f32(x))).sum()) for x in tensors)
        if nonfinite:
            out[t.key] = {"norm": None, "rank90": None, "rank99": None, "nonfinite": nonfinite}
            continue
        # ops.linalg takes torch tensors today; every library function accepts them.
        tt = _map_factors(t, to_torch)
        S = singular_values(tt)
        out[t.key] = {"norm": frobenius_norm(tt), "rank90": energy_rank(S, 0.90), "rank99": energy_rank(S, 0.99),
                      "nonfinite": 0}
    return out


def _map_factors(t, fn):
    from dataclasses import replace

    if t.kind == "full":
        return replace(t, delta=fn(t.delta))
    return t.with_blocks(replace(b, A=fn(b.A), B=fn(b.B)) for b in t.blocks)


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the adapter as read (numpy factors), the dialects read and written, bytes written."""

    adapter: Adapter
    dialect: str
    to: str
    bytes: int


def convert(path, output, *, to: str | None = None, overwrite: bool = False, kohya_prefix: str = "lora_unet_",
            **options) -> ConvertResult:
    """Read an adapter of any dialect and write it in another without changing ΔW, exactly or not at all.

    Args:
        path: the adapter (file or PEFT folder).
        output: the file or folder to write; with `to` None its name picks the dialect
            (io.registry.writer_for: ".safetensors" -> loratool, a folder -> peft).
        to: the dialect to write ("loratool", "peft", "kohya"), or None.
        overwrite: replace `output` if it exists.
        kohya_prefix: kohya only: the name prefix of targets not read from kohya.
        options: reader options (base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out).
    Returns:
        A ConvertResult.
    Raises:
        UsageError: `output`'s name is not one the chosen dialect is written to.
        FileError: `output` is an input, or exists without `overwrite`.
        MismatchError: kohya names without a base cannot become dotted keys.
        UnsupportedError: the conversion cannot be exact (the message says which target and why).
        SpecError, NumericError: as the reader or writer says.
    """
    from .errors import MismatchError
    from .fsutil import check_output
    from .io import registry

    writer = registry.writer_for(output, to)
    check_output(output, [path, options.get("base")], overwrite)
    src = registry.Source(path)
    d = registry.detect(src)
    adapter = registry.load(src, dialect=d, **options)
    if adapter.info.get("kohya_unmapped") and writer.name != d.name:
        raise MismatchError(f"{path}: kohya names such as \"{next(iter(adapter.targets))}\" cannot be turned back "
                            "into dotted module paths without the model; pass --base")
    nbytes = writer.write(adapter, output, overwrite=overwrite, prefix=kohya_prefix)
    return ConvertResult(adapter=adapter, dialect=d.name, to=writer.name, bytes=nbytes)
