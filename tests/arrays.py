"""Comparing factors that readers return as numpy arrays (ml_dtypes for BF16/FP8) with the torch tensors
builders and oracles (PEFT, loralib, sd-scripts) produce.

    same_array(x, y)   same dtype, same shape, same bits (numpy or torch on either side; NaN payloads too)
    dense_delta(t)     a target's dense float32 delta in the base tensor's shape, as a torch tensor, computed
                       in numpy from numpy or torch factors, so io tests need nothing of ops/
"""

from __future__ import annotations

import numpy as np
import torch

from loratool.dtypes import as_f32, as_numpy, dtype_of

_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def same_array(x, y) -> bool:
    """True when x and y (numpy arrays or torch tensors) have the same dtype, shape and bits."""
    a, b = as_numpy(x), as_numpy(y)
    if dtype_of(a) != dtype_of(b) or a.shape != b.shape:
        return False
    bits = _BITS[a.dtype.itemsize]
    return bool(np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits)))


def dense_delta(t) -> torch.Tensor:
    """ΔW of a target in its base tensor's shape, float32: each block adds (B @ A) * scale on its rectangle
    of the matrix view (the spec's definition, computed the way ops.linalg.delta_tensor does)."""
    if t.kind == "full":
        return torch.from_numpy(as_f32(t.delta) * np.float32(t.delta_scale))
    out, inp = t.matrix_shape
    M = np.zeros((out, inp), np.float32)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += (as_f32(b.B) @ as_f32(b.A)) * np.float32(b.scale)
    if t.layout in ("fan_in_fan_out", "embedding"):
        M = M.T
    elif t.layout in ("conv", "experts"):  # (out, in·k) or (E·out, in)
        M = M.reshape(t.shape)
    elif t.layout == "experts_t":  # M = W.reshape(E·in, out)^T
        M = M.T.reshape(t.shape)
    return torch.from_numpy(np.ascontiguousarray(M))


def skeleton(adapter):
    """The adapter with every factor and delta None: what `structure` returns for a file `load` reads."""
    from dataclasses import replace

    targets = []
    for t in adapter:
        targets.append(replace(t, delta=None, magnitude=None, factors={k: None for k in t.factors},
                               blocks=tuple(replace(b, A=None, B=None) for b in t.blocks)))
    return adapter.replace_targets(targets)
