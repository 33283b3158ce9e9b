"""Truncated SVD of a float32 matrix, written once for every device, and the error measures of a truncation.

Every function takes the `loratool.device.Device` the matrix lives on: numpy arrays on the CPU (no torch
import), torch tensors on CUDA, through the device's array namespace `dev.xp` (array-api-compat) and
`dev.matmul`. The same lines run on both, so the two agree to float32 rounding.

- `randomized_svd`: Halko, Martinsson & Tropp (2011), "Finding structure with randomness", algorithms 4.4
  (randomized subspace iteration) and 5.1: a seeded Gaussian sketch with oversampling, `n_iter` power
  iterations each re-orthonormalised by one shifted Cholesky QR (without it the sketch collapses onto the
  top singular vector in float32), an orthonormal final basis by shifted CholeskyQR3 (Householder QR where
  that fails), then the small SVD of the projection through an orthonormal basis of its rows. Every pass
  forms Y = M Z and Y^T M together (`project`): the next basis needs only span(M^T Y), and the last pass's
  Y^T M gives the projection Q^T M = T^T Y^T M (Q = Y T), so q iterations read M q + 1 times, not 2q + 2.
- The Gaussian test matrix is drawn with numpy on the host from a seed derived from (seed, tensor name),
  then moved to the device: a matrix gets the same sketch on every device and in every order.
- A matrix is given either as an array or as an operator (`DenseOperator` wraps an array; ops/extract_run.py's
  `StreamedDelta` re-reads a tensor pair from its files on every product): `randomized_svd` and
  `residual_squares` touch M only through `.shape`, `.matmul(X)` = M @ X and `.rmatmul(Qt)` = Qt @ M, an
  optional `.project(X)` = (M @ X, (M @ X)^T M) formed in one read (and the operator's own `residual_squares`), so one algorithm serves a matrix in memory and one too large to hold.
- `exact_svd`: the LAPACK (or cuSOLVER) thin SVD, of the transpose for a wide matrix; `prefers_exact` says
  when the sketch would be too large for the randomized method to gain anything.
- `quantile`: numpy selection (`np.partition`, linear time, no size limit; torch.quantile refuses inputs
  above 2^24 elements) of host values: factors are small and are brought to the host to be cast anyway.
- `sum_squares`, `residual_squares`: ||x||^2 and ||M - B A||^2 in float32 rows summed in float64.

Everything is float32 in, float32 out; shapes are written where they arise.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from array_api_compat import device as where

# One power iteration: within 1% of the optimum on low-rank-plus-noise deltas at ranks 16 and 64, at 1.3x the
# speed of two; spectra that decay slowly into noise may need two (benchmarks/README.md, "extract").
DEFAULT_POWER_ITERATIONS = 1
SHIFT = 1e-5  # relative diagonal shift of the Cholesky QR between power iterations
ORTHO_TOL = 1e-5  # max |Q^T Q - I| accepted from Cholesky QR before falling back to Householder
_UNIT_ROUNDOFF = 2.0 ** -24  # float32
_TINY = float(np.finfo(np.float32).tiny)
_ROW = 1024  # sum_squares: float32 dot products over rows of this many values, summed in float64


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
    """The test matrix Omega (n, l) float32 for one seed (see `seed_for`), drawn on the host for every device."""
    return np.random.default_rng(int(seed)).standard_normal((n, l), dtype=np.float32)


def exact_svd(dev, M):
    """Thin SVD of M (m, n) float32: U (m, r), S (r,), Vh (r, n), r = min(m, n).

    A wide matrix (m < n) is decomposed as its transpose, M^T = U' S V'^T, so U = V' and Vh = U'^T: LAPACK's
    and torch's SVDs are 2-3x slower on a wide matrix than on the same matrix transposed.
    """
    m, n = M.shape
    if m < n:
        Ut, S, Vht = dev.xp.linalg.svd(M.T, full_matrices=False)  # (n, m), (m,), (m, m)
        return Vht.T, S, Ut.T
    U, S, Vh = dev.xp.linalg.svd(M, full_matrices=False)
    return U, S, Vh


def _householder(dev, Y):
    """Orthonormal basis of the columns of Y (m, l) -> Q (m, l) (reduced Householder QR)."""
    return dev.xp.linalg.qr(Y, mode="reduced")[0]


def _chol_step(dev, Y, shift_of):
    """(Y R^-1, R^-1) with R^T R = Y^T Y + s I, s = shift_of(trace(Y^T Y)) (one Cholesky QR step), or None when
    the Cholesky factorisation fails.

    The Gram's rounding is float32's; it is factorised in float64, which costs nothing at l x l. R^-1 is
    formed explicitly and applied as one GEMM: numpy has no triangular solve, and its general solve, like
    its Householder QR, is 10-50x slower than a GEMM on these tall, thin matrices.
    """
    xp = dev.xp
    G = xp.astype(dev.matmul(Y.T, Y), xp.float64)  # (l, m) @ (m, l) -> (l, l)
    l = G.shape[0]
    shift = shift_of(float(xp.sum(xp.linalg.diagonal(G))))
    G = G + shift * xp.eye(l, dtype=xp.float64, device=where(G))
    try:
        L = xp.linalg.cholesky(G)  # G = L L^T, R = L^T
    except (ValueError, RuntimeError):  # numpy's LinAlgError is a ValueError, torch's a RuntimeError
        return None
    Rinv = xp.linalg.inv(L).T
    if not bool(xp.all(xp.isfinite(Rinv))):
        return None
    return dev.matmul(Y, xp.astype(Rinv, xp.float32)), Rinv  # Y R^-1 = Y L^-T: (m, l) @ (l, l)


def _normalize(dev, Y):
    """A well-conditioned basis of span(Y) (m, l) by one shifted Cholesky QR step.

    The shift (1e-5 of trace(Y^T Y)) keeps it defined for a rank-deficient Y and bounds the basis's
    condition number; a failed factorisation falls back to a Householder QR. Only the final basis must be
    orthonormal, and that one is `orthonormal_basis`'s.
    """
    Z = _chol_step(dev, Y, lambda trace: SHIFT * trace + _TINY)
    return _householder(dev, Y) if Z is None else Z[0]


def _cholqr3(dev, Y):
    """(Q, T): Q = Y T (m, l) orthonormal to float32 precision and T (l, l) float64, by shifted CholeskyQR3
    (Fukaya et al. 2020: a shifted Cholesky QR followed by two plain ones); None where it fails (a factorisation
    fails, or max |Q^T Q - I| > ORTHO_TOL: a nearly rank-deficient Y, such as the sketch of an exactly low-rank
    delta)."""
    xp = dev.xp
    m, l = Y.shape
    # Shift of the first step: ~11 (m l + l (l + 1)) u ||Y||^2 (Fukaya et al.), u the float32 unit roundoff.
    step = _chol_step(dev, Y, lambda trace: 11.0 * (m * l + l * (l + 1)) * _UNIT_ROUNDOFF * trace)
    if step is None:
        return None
    Q, T = step
    for _ in range(2):
        step = _chol_step(dev, Q, lambda trace: 0.0)
        if step is None:
            return None
        Q, T = step[0], T @ step[1]
    err = dev.matmul(Q.T, Q) - xp.eye(l, dtype=xp.float32, device=where(Q))  # (l, l)
    if not float(xp.max(xp.abs(err))) <= ORTHO_TOL:  # True for NaN too
        return None
    return Q, T


def orthonormal_basis(dev, Y):
    """An orthonormal basis of span(Y) (m, l), orthonormal to float32 precision.

    Shifted CholeskyQR3 (`_cholqr3`): three Grams and three small GEMMs, about 10x faster on the CPU than a
    Householder QR of a tall, thin matrix. A nearly rank-deficient Y (an exactly low-rank delta) fails its
    check or its factorisation and gets the Householder QR.
    """
    QT = _cholqr3(dev, Y)
    return _householder(dev, Y) if QT is None else QT[0]


def _thin_svd_wide(dev, P):
    """SVD of a wide P (l, n), l <= n, through an orthonormal basis of its rows (P^T = Q2 R2, then the l x l
    SVD of R2^T), which avoids LAPACK's slow path for a long, thin matrix. Returns Ub (l, l), S (l,),
    Vh (l, n)."""
    Q2 = orthonormal_basis(dev, P.T)  # (n, l), orthonormal
    R2t = dev.matmul(P, Q2)  # (l, n) @ (n, l) -> (l, l): P = R2t Q2^T
    Ur, S, Vrh = dev.xp.linalg.svd(R2t)  # (l, l) each
    return Ur, S, dev.matmul(Vrh, Q2.T)  # (l, l) @ (l, n) -> (l, n)


# CPU: M @ X and Y^T M are formed on row blocks of PROJECT_BLOCK_ELEMENTS (4 MiB of float32) while the block is
# in cache only for an M of more than PROJECT_MIN_BYTES, which does not stay in the last-level cache between
# two products; a smaller M costs the same in two plain products, whose BLAS threads better (benchmarks/README.md).
PROJECT_BLOCK_ELEMENTS = 1 << 20
PROJECT_MIN_BYTES = 128 << 20
# P = T^T (Y^T M) is used when ||T||_F ||Y||_F is at most this. The float32 rounding of Y^T M grows by about
# that factor: measured ||T^T W - Q^T M||_F ~ 3e-9 x ||T||_2 ||Y||_F x ||M||_F, so at most ~3e-5 of ||M||
# here; the sketches of the benchmark's deltas have ||T||_F ||Y||_F of 500-2500 (benchmarks/README.md "extract"). A sketch that is
# nearly rank-deficient (an exactly low-rank delta: growth 1e5 and more, or CholeskyQR3 fails) gets the
# projection Q^T M by one more product.
PROJECT_MAX_GROWTH = 1e4


class DenseOperator:
    """An array M (m, n) of `dev` seen as an operator: the products randomized_svd needs, as GEMMs."""

    def __init__(self, dev, M):
        self.dev, self.M = dev, M
        self.shape = tuple(int(x) for x in M.shape)
        self.dtype = M.dtype

    def matmul(self, X):
        """M @ X: (m, n) @ (n, l) -> (m, l)."""
        return self.dev.matmul(self.M, X)

    def rmatmul(self, Qt):
        """Qt @ M: (l, m) @ (m, n) -> (l, n). (numpy's BLAS runs Q^T @ M about 1.35x faster than M.T @ Q.)"""
        return self.dev.matmul(Qt, self.M)

    def project(self, X):
        """(Y, Y^T M) with Y = M @ X: (m, l), (l, n).

        On the CPU, for a row-major M larger than PROJECT_MIN_BYTES, both products are formed on row blocks
        of PROJECT_BLOCK_ELEMENTS while the block is in cache: M is read from memory once instead of twice (a
        product of M from memory costs ~1.5x one from the cache, benchmarks/README.md "extract"). Elsewhere,
        two plain products."""
        dev, M = self.dev, self.M
        m, n = self.shape
        rows = max(1, PROJECT_BLOCK_ELEMENTS // max(n, 1))
        if not (dev.is_cpu and M.flags.c_contiguous) or rows >= m or 4 * m * n <= PROJECT_MIN_BYTES:
            Y = dev.matmul(M, X)  # (m, n) @ (n, l) -> (m, l)
            return Y, dev.matmul(Y.T, M)  # (l, m) @ (m, n) -> (l, n)
        Y = dev.empty((m, X.shape[1]))
        W = dev.xp.zeros((X.shape[1], n), dtype=dev.xp.float32)
        part = dev.empty((X.shape[1], n))
        for r0 in range(0, m, rows):
            Mi, Yi = M[r0:r0 + rows], Y[r0:r0 + rows]
            dev.matmul(Mi, X, out=Yi)  # (rows, n) @ (n, l) -> (rows, l)
            W += dev.matmul(Yi.T, Mi, out=part)  # (l, rows) @ (rows, n) -> (l, n)
        return Y, W

    def residual_squares(self, B, A) -> float:
        return residual_squares(self.dev, self.M, B, A)


def is_operator(M) -> bool:
    """True for an operator object (the two products), False for an array."""
    return hasattr(M, "rmatmul")


def as_operator(dev, M):
    """M itself when it is an operator, else the array wrapped in a `DenseOperator`."""
    return M if is_operator(M) else DenseOperator(dev, M)


def project(op, X):
    """(Y, Y^T M) with Y = M @ X for an operator: its own `project` (both products in one read of M) where it
    has one, else its two products."""
    if hasattr(op, "project"):
        return op.project(X)
    Y = op.matmul(X)  # (m, n) @ (n, l) -> (m, l)
    return Y, op.rmatmul(Y.T)  # (l, m) @ (m, n) -> (l, n)


def _projection(dev, op, Y, W):
    """(Q, P): an orthonormal basis Q (m, l) of span(Y) and P = Q^T M (l, n), given W = Y^T M.

    With Q = Y T (shifted CholeskyQR3), P = T^T W exactly; it is used when T is well conditioned
    (PROJECT_MAX_GROWTH), else Q comes from the Householder QR where needed and P = Q^T M from one more
    product."""
    QT = _cholqr3(dev, Y)
    if QT is not None:
        Q, T = QT
        xp = dev.xp
        growth = math.sqrt(float(xp.sum(T * T)) * sum_squares(dev, Y))  # ||T||_F >= ||T||_2: no l x l SVD
        if growth <= PROJECT_MAX_GROWTH:
            return Q, dev.matmul(xp.astype(T.T, xp.float32), W)  # (l, l) @ (l, n) -> (l, n)
    else:
        Q = _householder(dev, Y)
    return Q, op.rmatmul(Q.T)  # (l, m) @ (m, n) -> (l, n)


def randomized_svd(dev, M, l: int, seed: int, n_iter: int = DEFAULT_POWER_ITERATIONS, Y=None, W=None):
    """Approximate top-l SVD of M (m, n) float32 by randomized subspace iteration (Halko et al. 2011, 4.4).

    Each pass over M forms Y = M Z and Y^T M together (`project`): the next basis Z of span(M^T Y) needs only
    the second, and the last pass's second is the projection of M on span(Y) (`_projection`), so q power
    iterations read M q + 1 times (the subspaces are those of Halko et al.'s algorithm, which reads M 2q + 2
    times).

    Args:
        dev: the Device M lives on (or an operator's products return arrays of).
        M: (m, n) float32 array of `dev` (may be a transposed view), or an operator with `.shape`,
            `.matmul(X)` = M @ X and `.rmatmul(Qt)` = Qt @ M, and optionally `.project(X)` (`as_operator`);
            every line below touches M only through those products, so an operator that reads M piece by
            piece gets the same algorithm.
        l: sketch columns (target rank plus oversampling), 1 <= l <= min(m, n).
        seed: see `seed_for`. n_iter: power iterations, each by M^T then M, re-orthonormalised.
        Y, W: the first sketch Y = M @ gaussian_sketch(n, l, seed) (m, l) and W = Y^T M (l, n), when the
            caller has formed them already (both, or neither is used).
    Returns:
        U (m, l), S (l,) descending, Vh (l, n), float32 arrays of `dev`, U and Vh orthonormal. U = Q Ub with Q
        an orthonormal basis of the sketch, so ||M - U_j diag(S_j) Vh_j||_F^2 = ||M||_F^2 - sum S[:j]^2 for
        every j.
    Raises:
        ValueError: l is outside 1..min(m, n).
    """
    op = as_operator(dev, M)
    m, n = op.shape
    if not 1 <= l <= min(m, n):
        raise ValueError(f"randomized_svd: sketch size {l} outside 1..{min(m, n)}")
    if Y is None or W is None:
        Y, W = project(op, dev.asarray(gaussian_sketch(n, l, seed)))  # (m, l), (l, n)
    for _ in range(n_iter):
        Z = _normalize(dev, W.T)  # a basis of span(M^T Y) (n, l)
        Y, W = project(op, Z)  # Y = M Z (m, l), W = Y^T M (l, n)
    Q, P = _projection(dev, op, Y, W)  # (m, l) orthonormal to float32 precision, (l, n) = Q^T M
    Ub, S, Vh = _thin_svd_wide(dev, P)  # (l, l), (l,), (l, n)
    return dev.matmul(Q, Ub), S, Vh  # (m, l) @ (l, l) -> (m, l)


def quantile(x: np.ndarray, q: float) -> float:
    """The linear-interpolation quantile (numpy's and torch.quantile's default) of any number of host values,
    by selection (np.partition: introselect, linear time; no size limit, unlike torch.quantile's 2^24)."""
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


def sum_squares(dev, x) -> float:
    """sum(x^2) of float32 values, accurate to ~1e-9 relative: float32 dot products over rows of 1024, summed
    in float64 (a flat float32 sum loses 1e-3 on 16M values; a float64 copy would double the memory)."""
    xp = dev.xp
    flat = xp.reshape(x, (-1,))
    n = flat.shape[0]
    main = n - n % _ROW
    total = 0.0
    if main:
        rows = xp.reshape(flat[:main], (-1, _ROW))
        total += float(xp.sum(xp.astype(xp.vecdot(rows, rows), xp.float64)))
    if n > main:
        rest = xp.astype(flat[main:], xp.float64)
        total += float(xp.sum(rest * rest))
    return total


def residual_squares(dev, M, B, A, chunk: int = 1 << 18) -> float:
    """||M - B A||_F^2 of M (m, n), B (m, k), A (k, n), float32 arrays of `dev`, by row blocks of about `chunk`
    elements (never a second m x n buffer). An operator M measures it itself, block by block as it reads."""
    if is_operator(M):
        return M.residual_squares(B, A)
    m, n = M.shape
    rows = max(1, chunk // max(n, 1))
    total = 0.0
    for r0 in range(0, m, rows):
        R = dev.matmul(B[r0:r0 + rows], A)  # (rows, k) @ (k, n) -> (rows, n)
        R -= M[r0:r0 + rows]
        total += sum_squares(dev, R)
    return total


__all__ = ["DEFAULT_POWER_ITERATIONS", "seed_for", "default_oversample", "sketch_size", "prefers_exact",
           "gaussian_sketch", "exact_svd", "DenseOperator", "is_operator", "as_operator", "project", "randomized_svd",
           "quantile", "sum_squares", "residual_squares"]
