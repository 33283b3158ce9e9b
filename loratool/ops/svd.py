"""Truncated SVD of dense float32 matrices, and a quantile that works on tensors of any size.

- `randomized_svd`: Halko, Martinsson & Tropp (2011), "Finding structure with randomness", algorithms 4.4
  (randomized subspace iteration) and 5.1: a Gaussian sketch with oversampling, `n_iter` power iterations
  each followed by a re-orthonormalisation (without it the sketch collapses onto the top singular
  vector in float32; a shifted Cholesky QR between iterations, a Householder QR for the final basis),
  then an exact SVD of the small projected matrix. Seeded: the sketch is drawn on the
  CPU from a generator seeded by (seed, name), so the result does not depend on the device, the batch or
  the order in which matrices arrive.
- `exact_svd`: torch.linalg.svd, of the transpose when the matrix is wide (torch's CPU SVD is 2-3x
  slower on wide matrices than on the same matrix transposed).
- Both work on a single (m, n) matrix or a batch (b, m, n) of same-shaped ones (the CUDA path batches).
- `quantile`: the linear-interpolation quantile of torch.quantile, computed with an unsorted torch.topk
  selection (introselect: linear time on any input), which has no element limit (torch.quantile refuses
  inputs above 2^24 elements). Not torch.kthvalue: its quickselect goes quadratic on sorted input.

Everything here is float32 in, float32 out; shapes are written where they arise.
"""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedError
from . import svd_host
from .svd_host import DEFAULT_POWER_ITERATIONS, SHIFT, default_oversample, prefers_exact, seed_for, sketch_size

def resolve_device(name: str) -> torch.device:
    """The one place that turns a --device value into a torch.device.

    Raises:
        UnsupportedError: "cuda" is asked for but torch sees no CUDA device.
    """
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UnsupportedError(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu")
        return torch.device(name)
    raise UnsupportedError(f"--device {name}: unknown device; use cpu or cuda")


def exact_svd(M: torch.Tensor):
    """Thin SVD of M (..., m, n) float32: U (..., m, r), S (..., r), Vh (..., r, n), r = min(m, n).

    A wide matrix (m < n) is decomposed as its transpose: M^T = U' S V'^T gives U = V', Vh = U'^T.
    """
    m, n = M.shape[-2:]
    if m < n:
        Ut, S, Vht = torch.linalg.svd(M.mT, full_matrices=False)  # (..., n, m), (..., m), (..., m, m)
        return Vht.mT, S, Ut.mT
    return torch.linalg.svd(M, full_matrices=False)


def gaussian_sketch(n: int, l: int, seeds: list[int], device) -> torch.Tensor:
    """Test matrices Ω (b, n, l), one per seed, drawn on the CPU by svd_host.gaussian_sketch (so the numpy
    route and every device use the same Ω) in float32."""
    out = torch.empty(len(seeds), n, l, dtype=torch.float32)
    for i, s in enumerate(seeds):
        out[i] = torch.from_numpy(svd_host.gaussian_sketch(n, l, s))
    return out.to(device)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of Y (..., m, l) -> Q (..., m, l) (reduced Householder QR)."""
    return torch.linalg.qr(Y, mode="reduced")[0]


def _normalize(Y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of span(Y) (..., m, l) by shifted Cholesky QR: Y R^-1, R^T R = Y^T Y + s I.

    The span is Y's (R is invertible); the shift, 1e-5 of trace(Y^T Y), keeps the factorisation defined when
    Y is rank-deficient (an exactly low-rank delta) and bounds the basis's condition number. Three GEMM-like
    operations instead of a Householder QR's column-by-column sweeps: 2-3x cheaper on the CPU. Only the
    final basis must be orthonormal, and that one is a QR.
    """
    G = Y.mT @ Y  # (..., l, m) @ (..., m, l) -> (..., l, l)
    l = G.shape[-1]
    shift = SHIFT * G.diagonal(dim1=-2, dim2=-1).sum(-1) + torch.finfo(torch.float32).tiny  # (...,)
    G = G + shift[..., None, None] * torch.eye(l, dtype=G.dtype, device=G.device)
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    if bool((info != 0).any()):
        return _orth(Y)
    return torch.linalg.solve_triangular(R, Y, upper=True, left=False)  # Y R^-1 (..., m, l)


def randomized_svd(M: torch.Tensor, l: int, seeds: list[int] | int, n_iter: int = DEFAULT_POWER_ITERATIONS):
    """Approximate top-l SVD of M by randomized subspace iteration (Halko et al. 2011, algorithm 4.4).

    Args:
        M: (m, n) or (b, m, n) float32, on any device; may be a non-contiguous view (a transpose).
           Results have M's number of dimensions.
        l: sketch columns (target rank plus oversampling), 1 <= l <= min(m, n).
        seeds: one seed per matrix of the batch (an int for a single matrix); see `seed_for`.
        n_iter: power iterations; each multiplies by M^T then M and re-orthonormalises.
    Returns:
        U (..., m, l), S (..., l) descending, Vh (..., l, n), all float32, with U and Vh orthonormal.
        U = Q Ub with Q an orthonormal basis of the sketch, so for any j the rank-j truncation
        U[:, :j] diag(S[:j]) Vh[:j] is the projection U_j U_j^T M and ||M - it||_F^2 = ||M||_F^2 - sum S[:j]^2.
    """
    if isinstance(seeds, int):
        seeds = [seeds]
    batched = M.ndim == 3 and M.shape[0] > 1  # a batch of one runs as plain 2-D products (faster on the CPU)
    one = M.ndim == 3 and not batched
    if one:
        M = M[0]
    m, n = M.shape[-2:]
    if len(seeds) != (M.shape[0] if batched else 1):
        raise ValueError(f"randomized_svd: {len(seeds)} seeds for {M.shape[0] if batched else 1} matrices")
    if not 1 <= l <= min(m, n):
        raise ValueError(f"randomized_svd: sketch size {l} outside 1..{min(m, n)}")
    Omega = gaussian_sketch(n, l, seeds, M.device)  # (b, n, l)
    if not batched:
        Omega = Omega[0]
    Y = M @ Omega  # (b, m, n) @ (b, n, l) -> (b, m, l)
    for _ in range(n_iter):
        Z = _normalize(M.mT @ _normalize(Y))  # (b, n, m) @ (b, m, l) -> (b, n, l)
        Y = M @ Z  # (b, m, n) @ (b, n, l) -> (b, m, l)
    Q = _orth(Y)  # orthonormal to float32 precision: the error identity below rests on it
    P = (M.mT @ Q).mT  # (b, n, m) @ (b, m, l) -> (b, n, l), seen as (b, l, n): Q^T M, M projected on the
    # sketch's range. Computed as (M^T Q)^T: MKL runs that 1.3-1.8x faster than Q^T @ M on the CPU.
    Ub, S, Vh = exact_svd(P)  # (b, l, l), (b, l), (b, l, n)
    U = Q @ Ub  # (b, m, l)
    if one:
        return U.unsqueeze(0), S.unsqueeze(0), Vh.unsqueeze(0)
    return U, S, Vh


def kth_smallest(v: torch.Tensor, i: int) -> float:
    """The i-th smallest value (0-based) of a 1-D tensor, by selection from the nearer end."""
    N = v.numel()
    if i + 1 <= N - i:
        return float(torch.topk(v, i + 1, largest=False, sorted=False).values.max())
    return float(torch.topk(v, N - i, largest=True, sorted=False).values.min())


def quantile(x: torch.Tensor, q: float) -> float:
    """torch.quantile(x, q) (linear interpolation) for a tensor of any size, by selection (no full sort).

    torch.quantile raises on inputs above 2^24 elements (the failure users of kohya's and PEFT's
    extractors hit on large layers); selection with torch.topk has no such limit.
    """
    v = x.reshape(-1).float()
    N = v.numel()
    if N == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} outside [0, 1]")
    pos = q * (N - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, N - 1)
    v_lo = kth_smallest(v, lo)
    if hi == lo or pos == lo:
        return v_lo
    v_hi = kth_smallest(v, hi)
    return v_lo + (pos - lo) * (v_hi - v_lo)


__all__ = ["resolve_device", "seed_for", "default_oversample", "sketch_size", "prefers_exact", "exact_svd",
           "gaussian_sketch", "randomized_svd", "quantile", "DEFAULT_POWER_ITERATIONS"]
