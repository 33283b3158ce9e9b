"""Shared linear algebra on adapters, in float32 and in factored form unless a caller asks for the dense
matrix. Shapes are written where they arise; M is a target's (out, in) matrix view.

Factors may be numpy arrays (any float dtype, ml_dtypes bfloat16 included) or torch tensors: each is copied
to float32 numpy at entry (`as_f32`: `dtypes.as_f32` after `held`), and every result is a numpy array.
`factored_svd` is written against the array namespace of its inputs (array-api-compat), so the same lines
run on torch tensors too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .. import dtypes
from ..adapter import Adapter, Block, Target
from ..dtypes import as_numpy, is_torch

F32 = np.float32


def held(x) -> np.ndarray:
    """A factor as a plain numpy array of its own dtype (torch tensors converted: dtypes.as_numpy)."""
    return as_numpy(x)


def as_f32(x) -> np.ndarray:
    """A contiguous float32 copy of a factor held in any of the ways `held` accepts."""
    return dtypes.as_f32(held(x))


def stacked_factors(t: Target) -> tuple[np.ndarray, np.ndarray]:
    """Write the target's delta as one product ΔM = Bs @ As, scales folded into Bs.

    Each block's factors are zero-padded to the whole matrix view, so overlapping blocks sum correctly.

    Returns:
        Bs (out, R) float32 and As (R, in) float32 with R = sum of block ranks.
    """
    out, inp = t.matrix_shape
    return rect_factors(t.blocks, ((0, out), (0, inp)))


def rect_factors(blocks, rect) -> tuple[np.ndarray, np.ndarray]:
    """Write the blocks' summed delta on the rectangle `rect` = ((r0, r1), (c0, c1)) of the matrix view as
    one product Bs @ As (float32, scales folded into Bs; every block must lie inside `rect`).

    Returns:
        Bs (h, R) and As (R, w) with h, w the rectangle's size and R the sum of the blocks' ranks.
    """
    (r0, r1), (c0, c1) = rect
    R = sum(b.rank for b in blocks)
    Bs = np.zeros((r1 - r0, R), F32)
    As = np.zeros((R, c1 - c0), F32)
    k = 0
    for b in blocks:
        Bs[b.rows[0] - r0:b.rows[1] - r0, k:k + b.rank] = as_f32(b.B) * F32(b.scale)  # (rows, r)
        As[k:k + b.rank, b.cols[0] - c0:b.cols[1] - c0] = as_f32(b.A)  # (r, cols)
        k += b.rank
    return Bs, As


def block_delta(b: Block) -> np.ndarray:
    """scale * B @ A in float32: (rows, r) @ (r, cols) -> (rows, cols)."""
    return (as_f32(b.B) @ as_f32(b.A)) * F32(b.scale)


def delta_matrix(t: Target) -> np.ndarray:
    """The dense (out, in) float32 delta of a lora target's matrix view. Materialises out x in."""
    M = np.zeros(t.matrix_shape, F32)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += block_delta(b)
    return M


def to_base_layout(t: Target, M):
    """Map a matrix-view delta (out, in) to the base tensor's own shape and orientation.

    A view where possible; M may be a numpy array or a torch tensor, and the result is of the same kind.
    """
    if t.layout in ("fan_in_fan_out", "embedding"):
        return M.T  # (in, out): GPT-2 Conv1D stores W transposed; PEFT embeddings use (B @ A)^T
    if t.layout in ("conv", "experts"):
        return M.reshape(t.shape)
    if t.layout == "experts_t":  # (out, E·in)^T = (E·in, out) -> (E, in, out)
        return M.T.reshape(t.shape)
    return M


def from_base_layout(t: Target, W):
    """Inverse of to_base_layout: the (out, in) matrix view of a tensor in the base's shape (same kind as W)."""
    if t.layout in ("fan_in_fan_out", "embedding"):
        return W.T
    if t.layout in ("conv", "experts"):
        return W.reshape(t.matrix_shape)
    if t.layout == "experts_t":
        return W.reshape(-1, t.shape[2]).T
    return W


def delta_tensor(t: Target) -> np.ndarray:
    """The dense float32 delta in the base tensor's shape, for any target kind."""
    if t.kind == "full":
        return as_f32(t.delta) * F32(t.delta_scale)
    if t.dense:  # LyCORIS kinds (ops/kinds.py)
        from .kinds import dense_matrix

        return to_base_layout(t, dense_matrix(t))
    return to_base_layout(t, delta_matrix(t))


def factored_svd(B, A):
    """SVD of the product B @ A without forming it (FORMATS.md, "Known algebra").

    Args:
        B: (m, R) float32 array. A: (R, n) float32 array, of the same array library as B (numpy, or torch on
            any device): the result is computed there (loratool.device), in float32.
    Returns:
        U (m, k), S (k,), Vh (k, n) with B @ A = U diag(S) Vh, S descending; k = R (or fewer when B or A has
        fewer rows than R).
    Cost O((m + n) R^2) instead of O(m n min(m, n)): orthonormal bases Qb of B's columns and Qa of A's rows
    (ops.svd's Cholesky QR, with Householder where B or A is nearly rank-deficient), then the SVD of the
    small core (Qb^T B)(A Qa).
    """
    from ..device import of
    from .svd import orthonormal_basis

    dev = of(B)
    Qb = orthonormal_basis(dev, B)  # (m, k1)
    Qa = orthonormal_basis(dev, A.T)  # (n, k2)
    core = dev.matmul(dev.matmul(Qb.T, B), dev.matmul(A, Qa))  # (k1, R) @ (R, k2) -> (k1, k2)
    Uc, S, Vhc = dev.xp.linalg.svd(core, full_matrices=False)
    return dev.matmul(Qb, Uc), S, dev.matmul(Vhc, Qa.T)  # (m, k), (k,), (k, n)


def singular_values(t: Target) -> np.ndarray:
    """Singular values of the target's delta (descending, float32), from the factors for lora targets."""
    if t.dense:
        D = delta_tensor(t)
        if D.ndim < 2:
            return np.sort(np.abs(D.reshape(-1)))[::-1]
        return np.linalg.svd(D.reshape(D.shape[0], -1), compute_uv=False)
    Bs, As = stacked_factors(t)
    return factored_svd(Bs, As)[1]


def frobenius_norm(t: Target) -> float:
    """||ΔW||_F exactly, from the factors: ||Bs As||_F^2 = trace((Bs^T Bs)(As As^T)), never out x in."""
    if t.dense:
        d = delta_tensor(t).reshape(-1).astype(np.float64)
        return math.sqrt(float(d @ d))
    Bs, As = stacked_factors(t)
    G = (Bs.T @ Bs) * (As @ As.T)  # (R, R) elementwise product; its sum is the trace of the product
    return math.sqrt(max(float(G.sum(dtype=np.float64)), 0.0))


def energy_rank(S, fraction: float) -> int:
    """Smallest k with sum(S[:k]^2) >= fraction * sum(S^2) (0 for a zero delta)."""
    e = np.asarray(held(S), dtype=np.float64) ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = np.cumsum(e) / total
    k = int(np.searchsorted(cum, fraction - 1e-12)) + 1
    return min(k, e.size)


__all__ = ["held", "as_f32", "stacked_factors", "rect_factors", "block_delta", "delta_matrix", "to_base_layout",
           "from_base_layout", "delta_tensor", "factored_svd", "singular_values", "frobenius_norm", "energy_rank"]
