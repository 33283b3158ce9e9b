"""The torch-free CPU route of a merge: `ops.merge.Merger`'s arithmetic on numpy arrays.

Same operations in the same order as the torch route (and so as PEFT's `weight.data += (B @ A) * scaling`):
the base rows widened exactly to float32, each delta's product from torch's own MKL sgemm (`ops.blas`,
which sums in torch's order), rounded, multiplied by its coefficient in float32, added in float32, and the
sum rounded once to the output dtype with round-to-nearest-even. `tests/test_hostmerge.py` checks that the
two routes agree bit for bit. It serves float16, bfloat16 and float32 tensors; a float64 base or output goes
through the torch route.

The caller (`cli.merge_cmd`) takes this route when the base is safetensors and `blas.available()`, which
saves `import torch` (2-4 s on a small machine, longer than copying a 2 GB model).
"""

from __future__ import annotations

import threading
import zlib
from typing import Sequence

import numpy as np

from ..adapter import GEMM_MIN_ROWS, block_rows_for
from ..hostarray import HOST_DTYPES, NP_DTYPES, as_f32, first_nonfinite, from_f32, to_f32
from . import blas, merge
from .merge import BLOCK_BYTES, PROBE_SEED, TRANSPOSED, Term, can_fold, is_power_of_two, nonfinite_error, \
    probe_relative_error, row_view_shape


def host_route(base_dtype: str, out_dtype: str, device: str = "cpu") -> bool:
    """Whether a tensor of `base_dtype` merged into `out_dtype` on `device` can take the numpy route."""
    return device == "cpu" and base_dtype in HOST_DTYPES and out_dtype in HOST_DTYPES and blas.available()


class _Piece(merge._Piece):
    """ops.merge._Piece on float32 numpy arrays (coef a numpy float32), with torch's sgemm for the product."""

    def delta(self, i0: int, i1: int, work: np.ndarray) -> np.ndarray:
        a, b = i0 - self.r0, i1 - self.r0
        if self.D is not None:
            return np.multiply(self.D[a:b], self.coef, out=work[:(b - a) * (self.c1 - self.c0)].reshape(b - a, -1))
        if self.transposed:  # (n_rows_M, r) @ (r, b - a) -> (n_rows_M, b - a), then ^T
            D = work[:(b - a) * self.B.shape[0]].reshape(self.B.shape[0], b - a)
            blas.gemm_f32(self.B, self.A[:, a:b], D)
        else:  # (b - a, r) @ (r, n_cols_M) -> (b - a, n_cols_M)
            D = work[:(b - a) * self.A.shape[1]].reshape(b - a, self.A.shape[1])
            blas.gemm_f32(self.B[a:b], self.A, D)
        if self.coef != 1.0:
            np.multiply(D, self.coef, out=D)  # float32 x float32, rounded: torch's D.mul_(coef)
        return D.T if self.transposed else D


def _span(x: np.ndarray) -> tuple[float, float]:
    a = np.abs(x)
    hi = float(a.max(initial=0.0))
    return (float(np.min(a, where=a > 0, initial=np.inf)), hi) if hi > 0 else (1.0, 1.0)


def _pieces(terms: Sequence[Term]) -> list[_Piece]:
    out = []
    for term in terms:
        t = term.target
        if t.kind == "full":
            rows, cols = row_view_shape(t.shape)
            D = as_f32(t.delta).reshape(rows, cols)
            out.append(_Piece(0, rows, 0, cols, np.float32(term.weight * t.delta_scale), D=D))
            continue
        tr = t.layout in TRANSPOSED
        for b in t.blocks:
            A, B = as_f32(b.A), as_f32(b.B)  # (r, n_cols_M), (n_rows_M, r)
            (r0, r1), (c0, c1) = (b.cols, b.rows) if tr else (b.rows, b.cols)
            coef = term.weight * b.scale
            if is_power_of_two(coef) and A.size and B.size and can_fold(coef, _span(B), _span(A), A.shape[0]):
                B, coef = B * np.float32(coef), 1.0
            out.append(_Piece(r0, r1, c0, c1, np.float32(coef), B=B, A=A, transposed=tr))
    return out


_local = threading.local()


def _scratch(numel: int, out_dtype: str):
    """Per-thread buffers (float32 rows, float32 delta, uint32 rounding scratch, output), reused across
    tensors so that no block allocates or faults in fresh pages."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    have = bufs.get(out_dtype)
    if have is None or have[0].size < numel:
        have = bufs[out_dtype] = (np.empty(numel, np.float32), np.empty(numel, np.float32),
                                  np.empty(numel, np.uint32), np.empty(numel, NP_DTYPES[out_dtype]))
    return have


class HostMerger:
    """`ops.merge.Merger` on numpy: `block(V, r0)` takes rows of the base's row view as raw numpy values of
    `base_dtype` (BF16 as uint16) and returns the merged rows as raw values of `out_dtype`.

    Raises (from block): NumericError naming the key when a merged value is NaN/Inf or overflows out_dtype.
    """

    host = True  # io.stream hands this transform numpy views instead of torch tensors

    def __init__(self, key: str, shape, base_dtype: str, terms: Sequence[Term], out_dtype: str, *,
                 probe: bool = False, block_bytes: int = BLOCK_BYTES):
        if not host_route(base_dtype, out_dtype):
            raise ValueError(f"the numpy route does not merge {base_dtype} into {out_dtype}")
        self.key, self.shape = key, tuple(shape)
        self.rows, self.cols = row_view_shape(self.shape)
        self.terms = list(terms)
        self.base_name, self.out_name = base_dtype, out_dtype
        self.pieces = _pieces(self.terms)
        self.block_rows = block_rows_for(self.rows, self.cols, block_bytes)
        self.probe = probe
        if probe:
            rng = np.random.default_rng(PROBE_SEED ^ zlib.crc32(key.encode("utf-8", "surrogatepass")))
            self._x = rng.standard_normal(self.cols)  # float64 probe in the row view: V'x
            self._y_new = np.zeros(self.rows)
            self._y_old = np.zeros(self.rows)

    def block(self, V: np.ndarray, r0: int) -> np.ndarray:
        """Merged rows [r0, r0 + len(V)) of the row view, raw values of out_dtype.

        The returned array is this thread's scratch: use it (write it out) before the next call.
        """
        blas.single_threaded()  # one tensor per worker thread; an MKL team per small product would stall
        with np.errstate(all="ignore"):  # overflow and NaN are found and reported below, not warned about
            return self._block(V, r0)

    def _block(self, V: np.ndarray, r0: int) -> np.ndarray:
        n, cols = V.shape[0], self.cols
        r1 = r0 + n
        x_buf, work, scratch, out_buf = _scratch((self.block_rows + GEMM_MIN_ROWS) * cols, self.out_name)
        X = x_buf[:n * cols].reshape(n, cols)
        to_f32(V, self.base_name, X)  # the one float32 copy of the base rows
        if self.probe:
            self._y_old[r0:r1] = X @ self._x  # float32 rows promoted to float64: (n, cols) @ (cols,)
        for p in self.pieces:
            i0, i1 = max(r0, p.r0), min(r1, p.r1)
            if i0 < i1:
                dst = X[i0 - r0:i1 - r0, p.c0:p.c1]
                np.add(dst, p.delta(i0, i1, work), out=dst)
        if self.out_name == "F32":
            out = X
        else:
            out = out_buf[:n * cols].reshape(n, cols)
            from_f32(X, self.out_name, out, scratch[:n * cols].reshape(n, cols))  # the one rounding
        bad = first_nonfinite(out, self.out_name)
        if bad is not None:
            finite = bool(np.isfinite(X).all())
            raise nonfinite_error(self.key, r0 + bad // cols, self.out_name,
                                  float(np.abs(X).max()) if finite else None)
        if self.probe:
            if self.out_name == "F32":
                self._y_new[r0:r1] = X @ self._x
            else:
                to_f32(out, self.out_name, X)
                self._y_new[r0:r1] = X @ self._x
        return out

    def probe_error(self) -> float:
        """As ops.merge.Merger.probe_error, in float64 numpy (factors widened from their float32 values)."""
        return probe_relative_error(self.terms, self._y_old, self._y_new, self._x, self.rows, self.cols,
                                    lambda t: as_f32(t).astype(np.float64))


__all__ = ["HostMerger", "host_route"]
