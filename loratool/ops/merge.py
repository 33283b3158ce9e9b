"""Merge adapters into base tensors, and take them out again: W' = W ± Σ w_i ΔW_i (FORMATS.md, "Operations").

Pure math on arrays; no file I/O. `plan_merge` checks every adapter target against the base and groups the
terms by base key; a `Merger` turns row blocks of one base tensor into row blocks of the merged tensor, so a
streaming writer never holds more than a cache-sized block of float32. It is written once against the device
layer (`loratool.device`): numpy on the CPU, torch on CUDA, the same lines.

Coordinates. A base tensor W of shape (d0, d1, ...) is cut along its first dimension: its *row view* is
V = W.reshape(d0, -1) (a 0-d or 1-d tensor is one column). The adapter's matrix view M (adapter.py) is
V itself for "linear" and "conv", and V^T for "fan_in_fan_out" and "embedding". A block adding
s·B @ A to M[rows, cols] therefore adds s·(B @ A) to V[rows, cols] (direct) or s·(B @ A)^T to
V[cols, rows] (transposed). A fused expert tensor (E, d1, d2) targeted by an "experts"/"experts_t" target is
cut finer, V = W.reshape(E·d1, d2) (`merge_view_shape`): M is then V ("experts") or V^T ("experts_t"), so
expert e's slice W[e] is V rows [e·d1, (e+1)·d1) and its blocks are ordinary direct or transposed pieces.

Arithmetic. Each delta is computed in float32 as (B @ A) then multiplied by its coefficient, added to the
float32 base block, and the sum is rounded once to the output dtype (round to nearest even, ml_dtypes):
the operations of PEFT's `merge` (`weight.data += transpose(B @ A) * scaling`) in the same order. Another
BLAS may sum the r products of an element in another order, so a merged value can differ from PEFT's by one
unit in the last place of the output dtype, never more (tests/test_merge.py measures it). A float64 base is
merged in float64.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .. import dtypes, spec
from ..adapter import EXPERT_LAYOUTS, Target, block_rows_for, row_spans
from ..container import escape
from ..device import Device, cpu
from .kinds import dora_apply
from ..errors import MismatchError, NumericError, UnsupportedError

FLOAT_DTYPES = spec.FLOAT_DTYPES
TRANSPOSED = ("fan_in_fan_out", "embedding", "experts_t")
BLOCK_BYTES = 1 << 20  # float32 bytes of one row block: stays in L2 while it is widened, added and rounded
PROBE_SEED = 0x10A7


@dataclass(frozen=True)
class Term:
    """One adapter's target applied to one base tensor with coefficient `weight` (negative to unmerge)."""

    target: Target
    weight: float
    source: str = ""  # the adapter's path, for messages


@dataclass
class Plan:
    """Terms per base key, and the mismatches skipped under allow_partial (one message each)."""

    terms: dict[str, list[Term]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def n_targets(self) -> int:
        return len(self.terms)


def _fit_problem(source: str, t: Target, info, quantized=()) -> str | None:
    where = f"{source}: target \"{escape(t.key)}\""
    if info is None:
        return f"{where} is not in the base (rule B001)"
    shape, dtype = tuple(info[0]), info[1]
    # before the shape: a packed quantized tensor's shape is not its weight's
    if dtype not in FLOAT_DTYPES and t.key not in quantized:
        return f"{where}: base tensor is {dtype}, {spec.quantized_refusal(dtype, shape)} (rule B003)"
    if shape != tuple(t.shape):
        return f"{where} has shape {list(t.shape)} but the base tensor is {list(shape)} (rule B002)"
    return None


def plan_merge(adapters: Sequence[tuple[str, Adapter]], base_info: Callable[[str], tuple | None], *,
               weights: Sequence[float] | None = None, scale: float = 1.0, unmerge: bool = False,
               allow_partial: bool = False, quantized=()) -> Plan:
    """Check every target of every adapter against the base and group the terms by base key.

    Args:
        adapters: (name shown in messages, adapter) pairs.
        base_info: key -> (shape, safetensors dtype name), or None when the base lacks the key.
        weights: one weight per adapter (default 1 each); the coefficient of a term is weight * scale,
            negated when `unmerge`.
        allow_partial: skip the targets that do not fit (their messages go to Plan.skipped) instead of raising.
        quantized: base keys of a quantized dtype that are merged all the same (float8 weights with scales that
            ops.fp8 dequantizes and requantizes).
    Returns:
        A Plan; its terms keep the adapters' order for each key.
    Raises:
        MismatchError: some targets do not fit and allow_partial is off; the message lists every one.
        NumericError: a weight or the scale is not finite.
    """
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise MismatchError(f"--weights has {len(weights)} values for {len(adapters)} adapters; give one weight "
                            "per adapter")
    for w in [*weights, scale]:
        if not math.isfinite(w):
            raise NumericError(f"weight or scale {w} is not finite; pass finite numbers")
    sign = -1.0 if unmerge else 1.0
    terms = defaultdict(list)
    problems = []
    for (name, adapter), w in zip(adapters, weights):
        for t in adapter:
            problem = _fit_problem(name, t, base_info(t.key), quantized)
            if t.is_dora and sign * w * scale != 1.0:
                raise UnsupportedError(
                    f"{name}: target \"{escape(t.key)}\" is DoRA, whose merge W' = m/‖W + ΔW‖·(W + ΔW) is not "
                    f"linear in ΔW, so a strength of {sign * w * scale:g} has no exact meaning"
                    + (" and W cannot be recovered from W' (the norm of W is lost); keep the base to undo a DoRA "
                       "merge" if unmerge else "; merge it with weight 1 and scale 1"))
            if problem:
                problems.append(problem)
            else:
                terms[t.key].append(Term(t, sign * w * scale, name))
    if problems and not allow_partial:
        n = len(problems)
        raise MismatchError(f"{n} adapter target{'s' if n > 1 else ''} do not fit the base: "
                            + "; ".join(problems) + "; use the adapter's own base, or pass --allow-partial to "
                            "skip them")
    return Plan(terms=dict(terms), skipped=problems)


def row_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the row view V = W.reshape(d0, -1); a 0-d or 1-d tensor has one column."""
    if len(shape) == 0:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def merge_view_shape(shape: tuple[int, ...], terms: Sequence[Term] = ()) -> tuple[int, int]:
    """(rows, cols) of the view a Merger cuts: the row view, or (E·d1, d2) for a fused expert tensor (E, d1, d2)
    that some term targets with an expert layout (module docstring)."""
    if len(shape) == 3 and any(t.target.layout in EXPERT_LAYOUTS for t in terms):
        return shape[0] * shape[1], shape[2]
    return row_view_shape(shape)


@dataclass
class _Piece:
    """One block in row-view coordinates: V[r0:r1, c0:c1] += coef * delta(rows i0:i1 of the piece)."""

    r0: int
    r1: int
    c0: int
    c1: int
    coef: float
    B: Any = None  # (n_rows_M, r): lora block, on the merger's device
    A: Any = None  # (r, n_cols_M)
    transposed: bool = False
    D: Any = None  # full delta, as the row view (rows, cols)
    dora: Any = None  # a DoRA target: the piece rescales W + ΔW (ops.kinds.dora_apply) instead of adding

    def delta(self, dev: Device, i0: int, i1: int, work):
        """coef x the delta of V rows [i0, i1) (absolute, inside [r0, r1)) over columns [c0, c1).

        `work` is flat scratch of at least (i1 - i0) x (c1 - c0) elements; the result lives in it. The product is
        rounded before the scaling, as PEFT's `(B @ A) * scaling`.
        """
        a, b = i0 - self.r0, i1 - self.r0
        n = (b - a) * (self.c1 - self.c0)
        if self.D is not None:
            D = work[:n].reshape(b - a, self.c1 - self.c0)
            D[...] = self.D[a:b]
        elif self.transposed:
            # V rows are M columns: (n_rows_M, r) @ (r, b - a) -> (n_rows_M, b - a), then ^T, as PEFT's transpose.
            D = dev.matmul(self.B, self.A[:, a:b], out=work[:n].reshape(self.B.shape[0], b - a))
        else:  # (b - a, r) @ (r, n_cols_M) -> (b - a, n_cols_M)
            D = dev.matmul(self.B[a:b], self.A, out=work[:n].reshape(b - a, self.A.shape[1]))
        if self.coef != 1.0:
            D *= self.coef
        return D.T if self.transposed else D


def _pieces(terms: Sequence[Term], dev: Device, compute: str) -> list[_Piece]:
    """The terms' blocks on the device; each term's target is `loaded()` (read now for a deferred target)."""
    return _pieces_of(_loaded(terms), dev, compute, merge_view_shape(terms[0].target.shape, terms) if terms else None)


def _loaded(terms: Sequence[Term]) -> list[Term]:
    """The terms with their targets' factors in memory (a deferred target is read from its file here)."""
    return [t if t.target.load is None else Term(t.target.loaded(), t.weight, t.source) for t in terms]


def _pieces_of(terms: Sequence[Term], dev: Device, compute: str, view=None) -> list[_Piece]:
    from .kinds import factored_matrix

    out = []
    for term in terms:
        t = term.target
        if t.dense:
            rows, cols = view or row_view_shape(t.shape)
            if t.kind == "full":
                D = dev.asarray(t.delta, compute).reshape(rows, cols)
            else:  # LyCORIS kinds: the exact dense delta on M (the row view of a linear or conv weight)
                D = dev.asarray(factored_matrix(t, np.float64 if compute == "F64" else np.float32), compute)
            out.append(_Piece(0, rows, 0, cols, term.weight * t.delta_scale, D=D))
            if t.is_dora:
                out.append(_Piece(0, rows, 0, cols, 1.0, dora=t, D=dev.asarray(t.magnitude, compute).reshape(-1)))
            continue
        tr = t.layout in TRANSPOSED
        for b in t.blocks:
            A = dev.asarray(b.A, compute)  # (r, n_cols_M)
            B = dev.asarray(b.B, compute)  # (n_rows_M, r)
            (r0, r1), (c0, c1) = (b.cols, b.rows) if tr else (b.rows, b.cols)
            out.append(_Piece(r0, r1, c0, c1, term.weight * b.scale, B=B, A=A, transposed=tr))
        if t.is_dora:  # D is the magnitude (1-D) on the device
            rows, cols = row_view_shape(t.shape)
            out.append(_Piece(0, rows, 0, cols, 1.0, dora=t, D=dev.asarray(t.magnitude, compute).reshape(-1)))
    return out


_local = threading.local()


def _scratch(numel: int, dev: Device, compute: str, out_name: str):
    """Per-thread buffers (rows in the compute dtype, a delta, the rounded output), grown on demand and reused
    across tensors: no block allocates or faults in fresh pages."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (dev.name, compute, out_name)
    have = bufs.get(key)
    if have is None or have[0].shape[0] < numel:
        have = bufs[key] = (dev.empty((numel,), compute), dev.empty((numel,), compute),
                            np.empty(numel, dtypes.np_dtype(out_name)))
    return have


class Merger:
    """Merge the terms of one base key into that tensor, one row block at a time.

    Call `block(V, r0)` with consecutive row blocks of the base's row view (numpy, any float dtype); it returns
    the merged rows as a numpy array of `out_dtype`. With `probe=True` it also accumulates W'x and Wx for a
    seeded random x, and `probe_error()` compares W'x with Wx + Σ coef·B(Ax).

    Raises (from block): NumericError naming the key when a merged value is NaN/Inf or overflows out_dtype.
    """

    def __init__(self, key: str, shape, base_dtype: str, terms: Sequence[Term], out_dtype: str, *,
                 device: Device | None = None, probe: bool = False, block_bytes: int = BLOCK_BYTES):
        self.key, self.shape = key, tuple(shape)
        self.terms = list(terms)
        self.rows, self.cols = merge_view_shape(self.shape, self.terms)
        self.row_view = (self.rows, self.cols)  # the Rewriter cuts the base tensor in these rows
        self.out_name = out_dtype
        self.dev = device or cpu()
        self.compute = "F64" if "F64" in (base_dtype, out_dtype) else "F32"
        self.pieces: list[_Piece] | None = None  # built at the first block, dropped after the last
        self.block_rows = block_rows_for(self.rows, self.cols, block_bytes, 8 if self.compute == "F64" else 4)
        from .kinds import dora_row_local

        dora = [t.target for t in self.terms if t.target.is_dora]
        if any(not dora_row_local(t) for t in dora):
            self.block_rows = self.rows  # a norm per column needs every row: the tensor is one block
        # DoRA is not linear in ΔW, so the probe's expected W'x comes from the same merge in float64.
        self._reference = Merger(key, shape, "F64", terms, "F64", block_bytes=block_bytes) \
            if probe and dora else None
        if self._reference is not None:
            self._reference.block_rows = self.block_rows
        self.probe = probe
        self._y_delta = None  # Σ coef·ΔW x, computed while the factors are in memory
        if probe:
            rng = np.random.default_rng(PROBE_SEED ^ zlib.crc32(key.encode("utf-8", "surrogatepass")))
            self._x = rng.standard_normal(self.cols)  # float64 probe in the row view: V'x
            self._y_new = np.zeros(self.rows)
            self._y_old = np.zeros(self.rows)

    def block(self, V: np.ndarray, r0: int, host: bool = True) -> np.ndarray:
        """Merged rows [r0, r0 + len(V)) of the row view, in out_dtype: a numpy array, or with `host=False` (and
        out_dtype the compute dtype) an array of the merge's device. V is numpy or an array of that device.

        The returned array is this thread's scratch: use it (write it out) before the next call.
        """
        with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN are found and refused below
            return self._block(V, r0, host)

    def _block(self, V: np.ndarray, r0: int, host: bool = True) -> np.ndarray:
        dev, n, cols = self.dev, V.shape[0], self.cols
        r1 = r0 + n
        rows_buf, work, out_buf = _scratch((self.block_rows + 64) * cols, dev, self.compute, self.out_name)
        X = dev.widen(V, self.compute, rows_buf[:n * cols].reshape(n, cols))  # the one widened copy of the rows
        if self.probe:
            self._y_old[r0:r1] = dev.to_numpy(X) @ self._x  # (n, cols) @ (cols,) -> (n,), in float64
        if self.pieces is None:
            # The factors (read from the adapter's file for a deferred target) and their copies in the compute
            # dtype exist only while this tensor is merged: a merge holds one target's factors at a time per
            # worker, whatever the adapter's size.
            terms = _loaded(self.terms)
            self.pieces = _pieces_of(terms, self.dev, self.compute, (self.rows, self.cols))
            if self.probe and self._reference is None:
                self._y_delta = probe_delta(terms, self._x, self.rows, self.cols)
            del terms
        pieces = self.pieces
        if r1 == self.rows:
            self.pieces = None
        for p in pieces:
            if p.dora is not None:  # every piece before it (its own ΔW included) is in X: W + ΔW
                dora_apply(X, p.dora, r0, p.D)
                continue
            i0, i1 = max(r0, p.r0), min(r1, p.r1)
            if i0 < i1:
                X[i0 - r0:i1 - r0, p.c0:p.c1] += p.delta(dev, i0, i1, work)
        if self._reference is not None:
            ref = self._reference.block(np.asarray(dev.to_numpy(V), np.float64), r0)  # V may be on the device
            self._y_ref = getattr(self, "_y_ref", np.zeros(self.rows))
            self._y_ref[r0:r1] = ref @ self._x
        big = dtypes.out_of_range(X, self.out_name)
        if big is not None:
            raise nonfinite_error(self.key, r0 + _first_bad_row(dev.to_numpy(X), self.out_name), self.out_name,
                                  None if math.isnan(big) else big)
        if not host and self.out_name == self.compute:
            if self.probe:
                self._y_new[r0:r1] = dev.to_numpy(X).astype(np.float64) @ self._x
            return X
        out = dev.narrow(X, self.out_name, out_buf[:n * cols].reshape(n, cols))  # the one rounding
        if self.probe:
            self._y_new[r0:r1] = out.astype(np.float64) @ self._x
        return out

    def probe_error(self) -> float:
        """Relative error ||W'x - (Wx + Σ coef·ΔW x)|| / max(||Wx + Σ coef·ΔW x||, ||Wx||), in float64
        (`probe_relative_error`)."""
        if self._reference is not None and hasattr(self, "_y_ref"):
            return _relative_error(self._y_old, self._y_ref, self._y_new)
        if self._y_delta is None:  # no block ran (an empty tensor), or the pieces were given
            self._y_delta = probe_delta(_loaded(self.terms), self._x, self.rows, self.cols)
        return _relative_error(self._y_old, self._y_old + self._y_delta, self._y_new)


def _first_bad_row(X: np.ndarray, out_name: str) -> int:
    """The first row of X holding a NaN, an Inf, or a value that overflows `out_name`."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(X) < dtypes.FINITE_MAX[out_name])
    return int(np.argmax(bad.any(axis=1)))


def probe_relative_error(terms: Sequence[Term], y_old, y_new, x, rows: int, cols: int) -> float:
    """||W'x - (Wx + Σ coef·ΔW x)|| / max(||Wx + Σ coef·ΔW x||, ||Wx||) in the row view, from y_old = Wx and
    y_new = W'x (float64 numpy); `probe_delta` gives Σ coef·ΔW x without forming ΔW, so an orientation, scale
    or index mistake in the merged tensor shows up as a large error."""
    return _relative_error(y_old, y_old + probe_delta(_loaded(terms), x, rows, cols), y_new)


def probe_delta(terms: Sequence[Term], x, rows: int, cols: int):
    """Σ coef·ΔW x in the row view (float64, (rows,)), from factors in memory.

    A direct block adds B(A x[cols]) to rows `rows`; a transposed one (V = M^T) adds A^T(B^T x[rows]) to
    rows `cols`.
    """
    def to64(a):
        return dtypes.as_numpy(a).astype(np.float64)

    y = np.zeros(rows)
    for term in terms:
        t = term.target
        if t.kind == "full":
            y += (to64(t.delta).reshape(rows, cols) @ x) * (term.weight * t.delta_scale)
            continue
        if t.dense:  # a LyCORIS kind: its dense delta, formed in float64
            from .kinds import factored_matrix

            y += (factored_matrix(t, np.float64) @ x) * (term.weight * t.delta_scale)
            continue
        for b in t.blocks:
            A, B, c = to64(b.A), to64(b.B), term.weight * b.scale
            if t.layout in TRANSPOSED:  # (cols_M, r) @ ((r, rows_M) @ (rows_M,)) -> (cols_M,)
                y[b.cols[0]:b.cols[1]] += (A.T @ (B.T @ x[b.rows[0]:b.rows[1]])) * c
            else:  # (rows_M, r) @ ((r, cols_M) @ (cols_M,)) -> (rows_M,)
                y[b.rows[0]:b.rows[1]] += (B @ (A @ x[b.cols[0]:b.cols[1]])) * c
    return y


def _relative_error(y_old, y, y_new) -> float:
    # Relative to the larger of Wx and the expected W'x: unmerging cancels, and rounding scales with both.
    ref = max(float(np.linalg.norm(y)), float(np.linalg.norm(y_old)))
    err = float(np.linalg.norm(y_new - y))
    return err / ref if ref > 0 else err


def nonfinite_error(key: str, row: int, out_name: str, overflow: float | None) -> NumericError:
    """The refusal of a merged tensor with a NaN or Inf at `row`; `overflow` is the largest merged value when
    every float32 value was finite (so the output dtype overflowed), else None."""
    if overflow is not None:
        return NumericError(f"target \"{escape(key)}\": merged value {overflow:.6g} (row {row}) overflows "
                            f"{out_name}; pass --dtype float32 or --dtype bfloat16 to widen the output, or lower "
                            "--scale")
    return NumericError(f"target \"{escape(key)}\": merged tensor has NaN or Inf at row {row}; check the base and "
                        "the adapter (`loratool inspect --stats`)")


def merge_tensor(W, key: str, terms: Sequence[Term], out_dtype: str | None = None, *,
                 device: Device | None = None, probe: bool = False) -> tuple[np.ndarray, float | None]:
    """Merge `terms` into the whole tensor W (numpy or torch; for in-memory bases and tests).

    Returns:
        (merged numpy array of W's shape in out_dtype (default W's dtype), probe relative error or None).
    """
    W = dtypes.as_numpy(W)
    base = dtypes.dtype_of(W)
    m = Merger(key, tuple(W.shape), base, terms, out_dtype or base, device=device, probe=probe)
    V = W.reshape(m.rows, m.cols)
    merged = np.concatenate([m.block(V[a:b], a).copy() for a, b in row_spans(m.rows, m.block_rows)])
    return merged.reshape(W.shape), (m.probe_error() if probe else None)


def merge_state_dict(state, plan: Plan, out_dtype: str | None = None, *, device: Device | None = None,
                     probe: bool = False) -> tuple[dict, dict]:
    """Merge a plan into an in-memory state dict (name -> numpy or torch). Returns (new state dict of numpy
    arrays for the merged keys, key -> probe error)."""
    new, errors = dict(state), {}
    for key, terms in plan.terms.items():
        new[key], e = merge_tensor(state[key], key, terms, out_dtype, device=device, probe=probe)
        if e is not None:
            errors[key] = e
    return new, errors


__all__ = ["Term", "Plan", "plan_merge", "Merger", "nonfinite_error", "probe_relative_error", "probe_delta",
           "merge_tensor", "merge_state_dict", "row_view_shape", "merge_view_shape", "FLOAT_DTYPES", "BLOCK_BYTES"]
