"""`loratool.inspect`: what an adapter is, from its headers and configs (its factors only with stats)."""

from __future__ import annotations

from collections import Counter

from ..adapter import Adapter
from ..fsutil import maps_os_errors


@maps_os_errors("path", writes=False)
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
    from .. import spec
    from ..io import registry

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


def target_stats(adapter: Adapter) -> dict[str, dict]:
    """Per target ||ΔW||_F, ranks for 90% and 99% of the energy and non-finite counts, from the factors.

    Factors may be numpy arrays or torch tensors; the linear algebra is ops.linalg's (factored, never out x in).
    """
    import numpy as np

    from ..ops.linalg import energy_rank, frobenius_norm, singular_values

    out = {}
    for t in adapter.as_numpy():
        tensors = [t.delta] if t.kind == "full" else [x for b in t.blocks for x in (b.A, b.B)]
        nonfinite = sum(int(x.size - np.count_nonzero(np.isfinite(x))) for x in tensors)
        if nonfinite:
            out[t.key] = {"norm": None, "rank90": None, "rank99": None, "nonfinite": nonfinite}
            continue
        S = singular_values(t)
        out[t.key] = {"norm": frobenius_norm(t), "rank90": energy_rank(S, 0.90), "rank99": energy_rank(S, 0.99),
                      "nonfinite": 0}
    return out



__all__ = ["inspect", "summary", "target_stats"]
