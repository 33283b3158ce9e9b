"""Distances in units in the last place (ulp): how tests say "within one rounding of the reference"."""

from __future__ import annotations

import numpy as np


def _ordered(a: np.ndarray) -> np.ndarray:
    """Float bit patterns mapped to integers whose order is the floats' order (adjacent floats differ by 1)."""
    width = a.dtype.itemsize
    signed = {2: np.int16, 4: np.int32, 8: np.int64}[width]
    b = np.ascontiguousarray(a).view(signed).astype(np.int64)
    top = np.int64(1) << (8 * width - 1)
    return np.where(b < 0, -(b + top), b)  # -0.0 and +0.0 both map to 0


def as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        from loratool.dtypes import from_torch

        return from_torch(t)
    return np.asarray(t)


def ulp_distance(got, want) -> np.ndarray:
    """Element-wise distance in ulp of the arrays' dtype (numpy or torch, same dtype and shape)."""
    g, w = as_numpy(got), as_numpy(want)
    assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, w.dtype, g.shape, w.shape)
    return np.abs(_ordered(g) - _ordered(w))


def assert_within_ulp(got: dict, want: dict, ulps: int = 1, identical: float | None = None) -> None:
    """Every tensor of `got` within `ulps` of `want`'s (same keys); with `identical`, at least that fraction of
    all elements bit-identical."""
    assert set(got) == set(want)
    n = same = 0
    for k in sorted(want):
        d = ulp_distance(got[k], want[k])
        assert d.size == 0 or int(d.max()) <= ulps, f"{k}: {int(d.max())} ulp from the reference"
        n += d.size
        same += int((d == 0).sum())
    if identical is not None and n:
        assert same / n >= identical, f"only {same}/{n} elements identical"
