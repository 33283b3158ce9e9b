"""Truncated SVD on numpy (the CPU route of `extract`), and the sketch rules shared with the torch route.

The algorithms are those of ops/svd.py (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1: a seeded
Gaussian sketch, power iterations re-orthonormalised by a shifted Cholesky QR, a Householder QR for the
final basis, an exact SVD of the small projection). numpy runs them on its own BLAS, which on the machines
measured here is 1.5-2x faster than torch's for these thin products, and without `import torch` (2-4 s).

The Gaussian test matrix is drawn here, with numpy, for both routes: a (seed, name) pair gives the same Ω on
the CPU and on CUDA, so the routes agree to float32 rounding.

Everything is float32 in, float32 out; shapes are written where they arise.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

# One power iteration: within 1% of the optimum on low-rank-plus-noise deltas at ranks 16 and 64, at 1.3x the
# speed of two; spectra that decay slowly into noise may need two (benchmarks/README.md, "extract").
DEFAULT_POWER_ITERATIONS = 1
SHIFT = 1e-5  # relative diagonal shift of the Cholesky QR between power iterations


def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed derived from the user's seed and a matrix's name (stable across runs and platforms)."""
    h = hashlib.sha256(f"{int(seed)}\0{name}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "little") >> 1


def default_oversample(k: int) -> int:
    """Oversampling p for target rank k: p = k (FORMATS.md, "Known algebra"), at least 8."""
    return max(int(k), 8)


def sketch_size(k: int, m: int, n: int, oversample: int | None = None) -> int:
    """Columns l = k + p of the sketch, never more than min(m, n)."""
    p = default_oversample(k) if oversample is None else int(oversample)
    return min(int(k) + p, m, n)


def prefers_exact(l: int, m: int, n: int) -> bool:
    """True when an exact SVD is the better choice: the sketch would span at least half of the small side.

    Past that point the randomized method does about as much work as the exact one and gains nothing.
    """
    return 2 * l >= min(m, n)


def gaussian_sketch(n: int, l: int, seed: int) -> np.ndarray:
    """The test matrix Ω (n, l) float32 for one seed (see `seed_for`); the same on every device."""
    return np.random.default_rng(int(seed)).standard_normal((n, l), dtype=np.float32)


def exact_svd(M: np.ndarray):
    """Thin SVD of M (m, n) float32: U (m, r), S (r,), Vh (r, n), r = min(m, n); a wide matrix as its transpose."""
    m, n = M.shape
    if m < n:
        Ut, S, Vht = np.linalg.svd(M.T, full_matrices=False)  # (n, m), (m,), (m, m)
        return np.ascontiguousarray(Vht.T), S, np.ascontiguousarray(Ut.T)
    return np.linalg.svd(M, full_matrices=False)


def _householder(Y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of Y (m, l) -> Q (m, l) (reduced Householder QR)."""
    return np.linalg.qr(Y, mode="reduced")[0]


def _chol_step(Y: np.ndarray, shift: float) -> np.ndarray | None:
    """Y R^-1 with R^T R = Y^T Y + shift I (one Cholesky QR step), or None when the Cholesky fails.

    R^-1 is formed explicitly (l x l, negligible) and applied as one GEMM: numpy has no triangular solve, and
    its general solve, like its Householder QR, is 10-50x slower than a GEMM on these tall, thin matrices.
    """
    G = Y.T @ Y  # (l, m) @ (m, l) -> (l, l)
    l = G.shape[0]
    G = G.astype(np.float64)  # the Gram's rounding is float32's; factorising it in float64 costs nothing
    G[np.diag_indices(l)] += shift
    try:
        L = np.linalg.cholesky(G)  # G = L L^T, R = L^T
    except np.linalg.LinAlgError:
        return None
    Linv = np.linalg.inv(L)
    if not np.isfinite(Linv).all():
        return None
    return Y @ Linv.T.astype(np.float32)  # Y R^-1 = Y L^-T: (m, l) @ (l, l)


def _normalize(Y: np.ndarray) -> np.ndarray:
    """A well-conditioned basis of span(Y) (m, l) by one shifted Cholesky QR step, as ops/svd.py's.

    The shift (1e-5 of trace(Y^T Y)) keeps it defined for a rank-deficient Y; a failed factorisation falls
    back to a Householder QR.
    """
    trace = float(np.einsum("ij,ij->", Y, Y, dtype=np.float64))
    Z = _chol_step(Y, SHIFT * trace + float(np.finfo(np.float32).tiny))
    return _householder(Y) if Z is None else Z


ORTHO_TOL = 1e-5  # max |Q^T Q - I| accepted from Cholesky QR before falling back to Householder


def _orth(Y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of span(Y) (m, l), orthonormal to float32 precision.

    Shifted Cholesky QR followed by two plain ones (shifted CholeskyQR3, Fukaya et al. 2020): three Grams and
    three small GEMMs, about 10x faster here than numpy's Householder QR of a tall, thin matrix. The result is
    checked (max |Q^T Q - I| <= 1e-5); a nearly rank-deficient Y (an exactly low-rank delta) fails the check or
    the factorisation and gets the Householder QR.
    """
    l = Y.shape[1]
    trace = float(np.einsum("ij,ij->", Y, Y, dtype=np.float64))
    # Shift of the first step: ~11 (m l + l (l + 1)) u ||Y||^2 (Fukaya et al.), u the float32 unit roundoff.
    shift = 11.0 * (Y.shape[0] * l + l * (l + 1)) * 2.0 ** -24 * trace
    Q = _chol_step(Y, shift)
    for _ in range(2):
        if Q is None:
            break
        Q = _chol_step(Q, 0.0)
    if Q is not None:
        err = Q.T @ Q
        err[np.diag_indices(l)] -= 1.0
        if np.isfinite(err).all() and float(np.abs(err).max()) <= ORTHO_TOL:
            return Q
    return _householder(Y)


def _thin_svd_wide(P: np.ndarray):
    """SVD of a wide P (l, n), l <= n: through an orthonormal basis of its rows (P^T = Q2 R2, then the l x l SVD
    of R2^T), which avoids LAPACK's slow path for a long, thin matrix. Returns Ub (l, l), S (l,), Vh (l, n)."""
    Q2 = _orth(P.T)  # (n, l), orthonormal
    R2t = P @ Q2  # (l, n) @ (n, l) -> (l, l): P = R2t Q2^T
    Ur, S, Vrh = np.linalg.svd(R2t)  # (l, l) each
    return Ur, S, Vrh @ Q2.T  # (l, l) @ (l, n) -> (l, n)


def randomized_svd(M: np.ndarray, l: int, seed: int, n_iter: int = DEFAULT_POWER_ITERATIONS,
                   Y: np.ndarray | None = None):
    """Approximate top-l SVD of M (m, n) float32 by randomized subspace iteration (Halko et al. 2011, 4.4).

    Args:
        M: (m, n) float32; may be a transposed view.
        l: sketch columns (target rank plus oversampling), 1 <= l <= min(m, n).
        seed: see `seed_for`. n_iter: power iterations, each by M^T then M, re-orthonormalised.
        Y: the first sketch M @ gaussian_sketch(n, l, seed) (m, l) when the caller has formed it already.
    Returns:
        U (m, l), S (l,) descending, Vh (l, n), float32, U and Vh orthonormal; U = Q Ub with Q an orthonormal
        basis of the sketch, so ||M - U_j diag(S_j) Vh_j||_F^2 = ||M||_F^2 - sum S[:j]^2 for every j.
    """
    m, n = M.shape
    if not 1 <= l <= min(m, n):
        raise ValueError(f"randomized_svd: sketch size {l} outside 1..{min(m, n)}")
    if Y is None:
        Y = M @ gaussian_sketch(n, l, seed)  # (m, n) @ (n, l) -> (m, l)
    # M^T Q is formed as (Q^T M)^T: numpy's BLAS runs Q^T @ M about 1.35x faster than M.T @ Q.
    for _ in range(n_iter):
        Z = _normalize((_normalize(Y).T @ M).T)  # (l, m) @ (m, n) -> (l, n), seen as (n, l)
        Y = M @ Z  # (m, n) @ (n, l) -> (m, l)
    Q = _orth(Y)  # orthonormal to float32 precision: the error identity above rests on it
    P = Q.T @ M  # (l, m) @ (m, n) -> (l, n): Q^T M
    Ub, S, Vh = _thin_svd_wide(P)  # (l, l), (l,), (l, n)
    return Q @ Ub, S, Vh  # (m, l) @ (l, l) -> (m, l)


def quantile(x: np.ndarray, q: float) -> float:
    """The linear-interpolation quantile (torch.quantile's and numpy's default) of any number of values, by
    selection (np.partition: introselect, linear time; no size limit, unlike torch.quantile's 2^24)."""
    v = np.asarray(x, dtype=np.float32).reshape(-1)
    N = v.size
    if N == 0:
        raise ValueError("quantile of an empty array")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    pos = q * (N - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, N - 1)
    part = np.partition(v, [lo, hi]) if hi != lo else np.partition(v, lo)
    v_lo = float(part[lo])
    if hi == lo or pos == lo:
        return v_lo
    return v_lo + (pos - lo) * (float(part[hi]) - v_lo)


def sum_squares(x: np.ndarray) -> float:
    """sum(x^2) of float32 values, accurate to ~1e-9 relative: float32 dot products over rows of 1024, summed in
    float64 (a flat float32 sum loses 1e-3 on 16M values)."""
    flat = x.reshape(-1)
    n = flat.size
    main = n - n % 1024
    total = 0.0
    if main:
        rows = flat[:main].reshape(-1, 1024)
        total += float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64))
    if n > main:
        rest = flat[main:].astype(np.float64)
        total += float(rest @ rest)
    return total


__all__ = ["DEFAULT_POWER_ITERATIONS", "seed_for", "default_oversample", "sketch_size", "prefers_exact",
           "gaussian_sketch", "exact_svd", "randomized_svd", "quantile", "sum_squares"]
