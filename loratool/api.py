"""Library entry points behind `validate` and `inspect`: plain data in, plain data out, no printing."""

from __future__ import annotations

import os
from collections import Counter

from .adapter import Adapter
from .validation import Report, check_base, check_values, validate_header


def validate_file(path, base=None, read_data: bool = True) -> Report:
    """Every rule of the spec on a native adapter file; with `base`, rules B001-B004 too.

    Args:
        path: the adapter file.
        base: a base model path (file or folder) or an opened io.base.BaseModel, or None.
        read_data: also read the factors for rules T006 and W003 (imports torch).
    Returns:
        A Report; `report.errors` is empty when the file is valid.
    """
    rep = validate_header(path)
    if rep.adapter is None or rep.errors:
        return rep
    if read_data:
        from .container import read_tensor

        class _OnDemand:
            """name -> tensor read when asked: validation holds one tensor at a time, whatever the file size."""

            def __init__(self, fd, header):
                self.fd, self.header = fd, header

            def get(self, name):
                info = self.header.tensors.get(name)
                return None if info is None else read_tensor(self.fd, self.header.data_start, info)

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


def target_stats(adapter: Adapter) -> dict[str, dict]:
    """Per target ||ΔW||_F, ranks for 90% and 99% of the energy and non-finite counts, from the factors."""
    import torch

    from .ops.linalg import energy_rank, frobenius_norm, singular_values

    out = {}
    for t in adapter:
        tensors = [t.delta] if t.kind == "full" else [x for b in t.blocks for x in (b.A, b.B)]
        nonfinite = sum(int((~torch.isfinite(x)).sum()) for x in tensors)
        if nonfinite:
            out[t.key] = {"norm": None, "rank90": None, "rank99": None, "nonfinite": nonfinite}
            continue
        S = singular_values(t)
        out[t.key] = {"norm": frobenius_norm(t), "rank90": energy_rank(S, 0.90), "rank99": energy_rank(S, 0.99),
                      "nonfinite": 0}
    return out
