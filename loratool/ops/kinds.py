"""The exact dense delta of the LyCORIS kinds (LoHa, LoKr, LoCon with a Tucker core) and the DoRA rescaling,
on numpy arrays (spec/FORMAT.md section 5.1; lycoris-lora's `functional/loha.py`, `lokr.py`, `locon.py`,
`general.py`).

Every delta here is on the matrix view M (out, in·k₁·…) of a linear or conv weight, which is also the merge's
row view, so a dense delta is added to the base rows as a full target's is. Factors keep LyCORIS's own shapes
(what its files hold), with the conventions of its modules:

  loha    w1a (out, r)  w1b (r, in·k)            ΔM = s·(w1a @ w1b) ⊙ (w2a @ w2b)
          Tucker: t1 (r, r, *k) w1a (r, out) w1b (r, in), each half rebuilt as
          H[p, q, …] = Σ_ij t[i, j, …] wa[i, p] wb[j, q]     (functional/loha.py HadaWeightTucker)
  lokr    w1 (a, c) or w1a (a, r) @ w1b (r, c); w2 (b, d, *k) or w2a (b, r) @ w2b (r, d·k…), or Tucker
          t2 (r, r, *k) w2a (r, b) w2b (r, d) rebuilt as above;  ΔM = s·kron(W1, W2 (b, d·k…))
          (kron of (a, c, 1, 1) and (b, d, kh, kw), LyCORIS's make_kron, is this kron of the row views)
  tucker  up (out, r) mid (r, r, *k) down (r, in);  ΔM = s·up @ (Σ_j mid[:, j, …] down[j, :])   (LoCon)

Scale rules (the reader computes s once, kept as Target.delta_scale): LoHa and LoCon s = alpha / r; LoKr
s = alpha / r when a factor is decomposed (r its rank), and s = 1 when both are whole (LyCORIS ignores alpha
then).
"""

from __future__ import annotations

import math

import numpy as np

from ..adapter import Target
from ..dtypes import as_numpy

ROW_LOCAL_LAYOUTS = ("linear", "conv")


def _f(x, dtype):
    return np.asarray(as_numpy(x), dtype=dtype)


def _tucker(t, wa, wb):
    """H[p, q, …] = Σ_ij t[i, j, …] wa[i, p] wb[j, q]: (r, r, *k), (r, P), (r, Q) -> (P, Q, *k)."""
    return np.einsum("ij...,ip,jq->pq...", t, wa, wb)


def factored_matrix(t: Target, dtype=np.float32) -> np.ndarray:
    """f(factors) of a LyCORIS target on the matrix view, (out, in·k…), unscaled; in `dtype`.

    Raises:
        ValueError: the target is not a LyCORIS kind (a reader checked the shapes, so they fit).
    """
    f = {k: _f(v, dtype) for k, v in t.factors.items() if v is not None}
    out = t.shape[0]
    if t.kind == "loha":
        if "t1" in f:
            W1 = _tucker(f["t1"], f["w1a"], f["w1b"]).reshape(out, -1)
            W2 = _tucker(f["t2"], f["w2a"], f["w2b"]).reshape(out, -1)
        else:  # (out, r) @ (r, in·k) -> (out, in·k)
            W1 = f["w1a"] @ f["w1b"].reshape(f["w1b"].shape[0], -1)
            W2 = f["w2a"] @ f["w2b"].reshape(f["w2b"].shape[0], -1)
        return W1 * W2
    if t.kind == "lokr":
        W1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]  # (a, c)
        if "w2" in f:
            W2 = f["w2"]
        elif "t2" in f:
            W2 = _tucker(f["t2"], f["w2a"], f["w2b"])  # (b, d, *k)
        else:
            W2 = f["w2a"] @ f["w2b"].reshape(f["w2b"].shape[0], -1)  # (b, r) @ (r, d·k) -> (b, d·k)
        return np.kron(W1, W2.reshape(W2.shape[0], -1))  # (a·b, c·d·k)
    if t.kind == "tucker":
        A = np.einsum("ij...,jq->iq...", f["mid"], f["down"]).reshape(f["mid"].shape[0], -1)  # (r, in·k)
        return f["up"] @ A  # (out, r) @ (r, in·k)
    raise ValueError(f"target kind {t.kind!r} has no factored delta")


def dense_matrix(t: Target, dtype=np.float32) -> np.ndarray:
    """The exact ΔM = delta_scale · f(factors) of a LyCORIS target, (out, in·k…), in `dtype`."""
    M = factored_matrix(t, dtype)
    if t.delta_scale != 1.0:
        M *= M.dtype.type(t.delta_scale)
    return M


def dora_row_local(t: Target) -> bool:
    """Whether the DoRA norm of `t` is one per row of the merge's row view (W.reshape(out, -1)): true for
    linear and conv weights with the norm per output row (PEFT; LyCORIS wd_on_out=True)."""
    return t.dora_axis == "out" and t.layout in ROW_LOCAL_LAYOUTS


def dora_apply(X, t: Target, r0: int, m=None):
    """W' = m / (‖W + ΔW‖ + eps) · (W + ΔW) in place on X, which holds W + ΔW as rows [r0, r0 + len(X)) of the
    row view (all rows when the norm is not row-local). Returns X.

    The norm axis (spec rule D003): `dora_axis` "out" is per row of M (the row view's rows for linear and
    conv, its columns for fan_in_fan_out); "in" is per input channel, over the output rows and the kernel.
    """
    import array_api_compat

    xp = array_api_compat.array_namespace(X)
    if m is None:
        m = np.asarray(as_numpy(t.magnitude), dtype=X.dtype).reshape(-1)
    eps = float(t.dora_eps)  # a Python float keeps X's dtype
    if dora_row_local(t):
        n = X.shape[0]
        norm = xp.sqrt(xp.sum(X * X, axis=1)) + eps  # (n,)
        X *= (m[r0:r0 + n] / norm)[:, None]
        return X
    rows, cols = X.shape
    if t.dora_axis == "out":  # fan_in_fan_out: M = V^T, one norm per column of V
        G = X.reshape(rows, cols, 1)
    else:  # one norm per input channel c of a linear or conv weight: V = W.reshape(out, in, k) over (out, k)
        G = X.reshape(rows, t.shape[1], -1)
    norm = xp.sqrt(xp.sum(G * G, axis=(0, 2))) + eps  # (channels,)
    G *= (m / norm)[None, :, None]
    return X


def magnitude_length(t: Target) -> int:
    """The length the magnitude of `t` must have (spec rule D002): out rows of M, or input channels."""
    from ..kind_shapes import magnitude_length as length

    return length(t.layout, t.shape, t.dora_axis, t.matrix_shape[0])


def relative_error(D: np.ndarray, E: np.ndarray) -> float:
    """‖D − E‖_F / ‖D‖_F in float64 (0 for two zero deltas)."""
    d = float(np.linalg.norm(np.asarray(D, np.float64)))
    e = float(np.linalg.norm(np.asarray(D, np.float64) - np.asarray(E, np.float64)))
    return e / d if d > 0 else e


__all__ = ["factored_matrix", "dense_matrix", "dora_apply", "dora_row_local", "magnitude_length",
           "relative_error"]
