"""Merge adapters into base tensors, and take them out again: W' = W ± Σ w_i ΔW_i (FORMATS.md, "Operations").

Pure math on torch tensors; no file I/O. `plan_merge` checks every adapter target against the base and
groups the terms by base key; a `Merger` turns row blocks of one base tensor into row blocks of the merged
tensor, so a streaming writer never holds more than a cache-sized block of float32.

Coordinates. A base tensor W of shape (d0, d1, ...) is cut along its first dimension: its *row view* is
V = W.reshape(d0, -1) (a 0-d or 1-d tensor is one column). The adapter's matrix view M (adapter.py) is
V itself for "linear" and "conv", and V^T for "fan_in_fan_out" and "embedding". A block adding
s·B @ A to M[rows, cols] therefore adds s·(B @ A) to V[rows, cols] (direct) or s·(B @ A)^T to
V[cols, rows] (transposed).

Arithmetic. Each delta is computed in float32 as (B @ A) then multiplied by its coefficient, added to
the float32 base block, and the sum is cast once to the output dtype: the same operations, in the
same order, as PEFT's unsafe `merge` (`weight.data += transpose(B @ A) * scaling`), so a single adapter
at weight 1 reproduces PEFT's merged weights bit for bit. A float64 base is merged in float64.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .. import spec
from ..adapter import GEMM_MIN_ROWS, Adapter, Target, block_rows_for, row_spans
from ..container import dtype_name, escape, torch_dtype
from ..errors import MismatchError, NumericError
from ..hostarray import as_torch

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = spec.FLOAT_DTYPES
TRANSPOSED = ("fan_in_fan_out", "embedding")
BLOCK_BYTES = 1 << 20  # float32 bytes of one row block: stays in L2, and ~100 us of work per torch call
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


def _fit_problem(source: str, t: Target, info) -> str | None:
    where = f"{source}: target \"{escape(t.key)}\""
    if info is None:
        return f"{where} is not in the base (rule B001)"
    shape, dtype = tuple(info[0]), info[1]
    if shape != tuple(t.shape):
        return f"{where} has shape {list(t.shape)} but the base tensor is {list(shape)} (rule B002)"
    if dtype not in FLOAT_DTYPES:
        return f"{where}: base tensor is {dtype}; integer and quantized tensors cannot be merged (rule B003)"
    return None


def plan_merge(adapters: Sequence[tuple[str, Adapter]], base_info: Callable[[str], tuple | None], *,
               weights: Sequence[float] | None = None, scale: float = 1.0, unmerge: bool = False,
               allow_partial: bool = False) -> Plan:
    """Check every target of every adapter against the base and group the terms by base key.

    Args:
        adapters: (name shown in messages, adapter) pairs.
        base_info: key -> (shape, safetensors dtype name), or None when the base lacks the key.
        weights: one weight per adapter (default 1 each); the coefficient of a term is weight * scale,
            negated when `unmerge`.
        allow_partial: skip the targets that do not fit (their messages go to Plan.skipped) instead of raising.
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
            problem = _fit_problem(name, t, base_info(t.key))
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


@dataclass
class _Piece:
    """One block in row-view coordinates: V[r0:r1, c0:c1] += coef * delta(rows i0:i1 of the piece).

    The factors are torch tensors here; ops.merge_host's subclass holds float32 numpy arrays."""

    r0: int
    r1: int
    c0: int
    c1: int
    coef: float
    B: Any = None  # (n_rows_M, r): lora block
    A: Any = None  # (r, n_cols_M)
    transposed: bool = False
    D: Any = None  # full delta, as the row view (rows, cols)

    def delta(self, i0: int, i1: int, work: torch.Tensor) -> torch.Tensor:
        """coef x the delta of V rows [i0, i1) (absolute, inside [r0, r1)) over columns [c0, c1).

        `work` is scratch of at least (i1 - i0) x (c1 - c0) elements; the result may live in it.
        The product is rounded before the scaling, as PEFT's `(B @ A) * scaling`.
        """
        import torch

        a, b = i0 - self.r0, i1 - self.r0
        if self.D is not None:
            return torch.mul(self.D[a:b], self.coef, out=work[:(b - a) * (self.c1 - self.c0)].view(b - a, -1))
        if self.transposed:
            # V rows are M columns: (n_rows_M, r) @ (r, b - a) -> (n_rows_M, b - a), then ^T, as PEFT's transpose.
            D = torch.mm(self.B, self.A[:, a:b], out=work[:(b - a) * self.B.shape[0]].view(self.B.shape[0], b - a))
            return (D.mul_(self.coef) if self.coef != 1.0 else D).T
        # (b - a, r) @ (r, n_cols_M) -> (b - a, n_cols_M)
        D = torch.mm(self.B[a:b], self.A, out=work[:(b - a) * self.A.shape[1]].view(b - a, self.A.shape[1]))
        return D.mul_(self.coef) if self.coef != 1.0 else D


def _pieces(terms: Sequence[Term], compute, device) -> list[_Piece]:
    out = []  # factors read by the numpy route (HostTensor) are converted here
    for term in terms:
        t = term.target
        if t.kind == "full":
            rows, cols = row_view_shape(t.shape)
            D = as_torch(t.delta).to(device=device, dtype=compute).reshape(rows, cols)
            out.append(_Piece(0, rows, 0, cols, term.weight * t.delta_scale, D=D))
            continue
        tr = t.layout in TRANSPOSED
        for b in t.blocks:
            A = as_torch(b.A).to(device=device, dtype=compute)  # (r, n_cols_M)
            B = as_torch(b.B).to(device=device, dtype=compute)  # (n_rows_M, r)
            (r0, r1), (c0, c1) = (b.cols, b.rows) if tr else (b.rows, b.cols)
            coef = term.weight * b.scale
            B, coef = _fold_power_of_two(B, A, coef)
            out.append(_Piece(r0, r1, c0, c1, coef, B=B, A=A, transposed=tr))
    return out


def is_power_of_two(coef: float) -> bool:
    """±2^k other than 1 (multiplying by 1 needs no pass to save)."""
    return coef != 1.0 and math.frexp(coef)[0] in (0.5, -0.5)


def can_fold(coef: float, b_span: tuple[float, float], a_span: tuple[float, float], rank: int) -> bool:
    """Whether a power-of-two coefficient (alpha = 2r gives 2) can be folded into B, saving a pass per block.

    Scaling by 2^k commutes with every rounding of B @ A (products, sums, FMAs) as long as no value is
    subnormal or overflows: then (2^k B) @ A == (B @ A) * 2^k bit for bit. The fold is allowed only when the
    factors' magnitudes rule that out: every nonzero product is at least 2^-100 (so every nonzero partial
    sum, a multiple of its ulp, is normal) and every sum of r products stays below 2^100.
    b_span, a_span: (smallest nonzero, largest) magnitude of B and of A.
    """
    if not is_power_of_two(coef):
        return False
    (blo, bhi), (alo, ahi) = b_span, a_span
    small = blo * alo * min(1.0, abs(coef))
    big = bhi * ahi * rank * max(1.0, abs(coef))
    return math.isfinite(big) and small >= 2.0 ** -100 and big < 2.0 ** 100


def _fold_power_of_two(B: torch.Tensor, A: torch.Tensor, coef: float) -> tuple[torch.Tensor, float]:
    """(B * coef, 1.0) when `can_fold` allows it, else (B, coef)."""
    import torch

    if not is_power_of_two(coef) or B.dtype != torch.float32 or B.numel() == 0 or A.numel() == 0:
        return B, coef

    def span(x):  # (smallest nonzero, largest) magnitude, without a boolean-mask gather (slow)
        a = x.abs()
        hi = float(a.max())
        return (float(torch.where(a > 0, a, math.inf).min()), hi) if hi > 0 else (1.0, 1.0)

    if not can_fold(coef, span(B), span(A), A.shape[0]):
        return B, coef
    return B * coef, 1.0


_local = threading.local()


def _scratch(numel: int, compute, out_dtype, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-thread scratch, grown on demand and reused across tensors: no allocation or page fault per block."""
    import torch

    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    key = (compute, out_dtype, str(device))
    have = bufs.get(key)
    if have is None or have[1].numel() < numel:
        have = bufs[key] = ([torch.empty(numel, dtype=compute, device=device) for _ in range(2)],
                            torch.empty(numel, dtype=out_dtype))
    return have


class Merger:
    """Merge the terms of one base key into that tensor, one row block at a time.

    Call `block(V, r0)` with consecutive row blocks of the base's row view (any float dtype, on any device);
    it returns the merged rows in `out_dtype`, on the CPU. With `probe=True` it also accumulates
    W'x and Wx for a seeded random x, and `probe_error()` compares W'x with Wx + Σ coef·B(Ax).

    Raises (from block): NumericError naming the key when a merged value is NaN/Inf or overflows out_dtype.
    """

    def __init__(self, key: str, shape, base_dtype: str, terms: Sequence[Term], out_dtype: str, *,
                 device: str = "cpu", probe: bool = False, block_bytes: int = BLOCK_BYTES):
        import torch

        self.key, self.shape = key, tuple(shape)
        self.rows, self.cols = row_view_shape(self.shape)
        self.terms = list(terms)
        self.out_name = out_dtype
        self.out_dtype = torch_dtype(out_dtype)
        self.compute = torch.float64 if "F64" in (base_dtype, out_dtype) else torch.float32
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # TF32 would round the factors to 10 mantissa bits; the merge must equal the CPU result.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.pieces = _pieces(self.terms, self.compute, self.device)
        esize = 8 if self.compute == torch.float64 else 4
        self.block_rows = block_rows_for(self.rows, self.cols, block_bytes, esize)
        self.probe = probe
        if probe:
            g = torch.Generator().manual_seed(PROBE_SEED ^ zlib.crc32(key.encode("utf-8", "surrogatepass")))
            self._x = torch.randn(self.cols, generator=g, dtype=torch.float64)  # probe in the row view: V'x
            self._y_new = torch.zeros(self.rows, dtype=torch.float64)
            self._y_old = torch.zeros(self.rows, dtype=torch.float64)

    def block(self, V: torch.Tensor, r0: int) -> torch.Tensor:
        """Merged rows [r0, r0 + len(V)) of the row view, in out_dtype on the CPU.

        The returned tensor is this thread's scratch: use it (write it out) before the next call.
        """
        n = V.shape[0]
        r1 = r0 + n
        work, out_buf = _scratch((self.block_rows + GEMM_MIN_ROWS) * self.cols, self.compute, self.out_dtype,
                                 self.device)
        X = work[0][:n * self.cols].view(n, self.cols)
        X.copy_(V)  # (n, cols): the one float32 copy of the base rows (a mixed-dtype add is slower)
        for p in self.pieces:
            i0, i1 = max(r0, p.r0), min(r1, p.r1)
            if i0 < i1:
                X[i0 - r0:i1 - r0, p.c0:p.c1] += p.delta(i0, i1, work[1])
        out = out_buf[:n * self.cols].view(n, self.cols)
        out.copy_(X)  # the one rounding to the output dtype
        self._check(out, X, r0)
        if self.probe:
            self._accumulate(V, out, r0)
        return out

    def _check(self, out: torch.Tensor, X: torch.Tensor, r0: int) -> None:
        import torch

        # One cheap reduction over the float32 block: NaN/Inf propagate into a min/max (and into a sum, which
        # overflows only for values near the float32 limit); only a suspicious block is examined element-wise.
        if self.out_dtype == torch.float16:
            lo, hi = torch.aminmax(X)
            ok = math.isfinite(float(lo)) and math.isfinite(float(hi)) and max(-float(lo), float(hi)) <= 65504.0
        else:
            ok = math.isfinite(float(X.sum()))
        if ok or bool(torch.isfinite(out).all()):
            return
        bad = (~torch.isfinite(out)).nonzero()[0].tolist()
        finite = bool(torch.isfinite(X).all())
        raise nonfinite_error(self.key, r0 + bad[0], self.out_name, float(X.abs().max()) if finite else None)

    def _accumulate(self, V, out, r0) -> None:
        import torch

        r1 = r0 + V.shape[0]
        self._y_old[r0:r1] = V.to("cpu", torch.float64) @ self._x  # (rows, cols) @ (cols,) -> (rows,)
        self._y_new[r0:r1] = out.to("cpu", torch.float64) @ self._x

    def probe_error(self) -> float:
        """Relative error ||W'x - (Wx + Σ coef·ΔW x)|| / max(||Wx + Σ coef·ΔW x||, ||Wx||), in float64
        (`probe_relative_error`)."""
        import torch

        return probe_relative_error(self.terms, self._y_old, self._y_new, self._x, self.rows, self.cols,
                                    lambda t: as_torch(t).to(torch.float64))


def probe_relative_error(terms: Sequence[Term], y_old, y_new, x, rows: int, cols: int, to64) -> float:
    """||W'x - (Wx + Σ coef·ΔW x)|| / max(||Wx + Σ coef·ΔW x||, ||Wx||) in the row view, from y_old = Wx and
    y_new = W'x; `to64` turns a factor or delta into a float64 array of x's kind (numpy or torch).

    In the row view a direct block adds B(A x[cols]) to rows `rows`; a transposed one (V = M^T) adds
    A^T(B^T x[rows]) to rows `cols`. Neither forms ΔW, so an orientation, scale or index mistake in the
    merged tensor shows up as a large error.
    """
    y = y_old + 0  # a copy, of either kind
    for term in terms:
        t = term.target
        if t.kind == "full":
            y += (to64(t.delta).reshape(rows, cols) @ x) * (term.weight * t.delta_scale)
            continue
        for b in t.blocks:
            A, B, c = to64(b.A), to64(b.B), term.weight * b.scale
            if t.layout in TRANSPOSED:  # (cols_M, r) @ ((r, rows_M) @ (rows_M,)) -> (cols_M,)
                y[b.cols[0]:b.cols[1]] += (A.T @ (B.T @ x[b.rows[0]:b.rows[1]])) * c
            else:  # (rows_M, r) @ ((r, cols_M) @ (cols_M,)) -> (rows_M,)
                y[b.rows[0]:b.rows[1]] += (B @ (A @ x[b.cols[0]:b.cols[1]])) * c

    def norm(v) -> float:
        return math.sqrt(float((v * v).sum()))

    # Relative to the larger of Wx and the expected W'x: unmerging cancels, and rounding scales with both.
    ref = max(norm(y), norm(y_old))
    err = norm(y_new - y)
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


def merge_tensor(W: torch.Tensor, key: str, terms: Sequence[Term], out_dtype: str | None = None, *,
                 device: str = "cpu", probe: bool = False) -> tuple[torch.Tensor, float | None]:
    """Merge `terms` into the whole tensor W (for in-memory bases and tests).

    Returns:
        (merged tensor of W's shape in out_dtype (default W's dtype), probe relative error or None).
    """
    base = dtype_name(W.dtype)
    m = Merger(key, tuple(W.shape), base, terms, out_dtype or base, device=device, probe=probe)
    V = W.reshape(m.rows, m.cols)
    import torch

    blocks = [m.block(V[a:b], a).clone() for a, b in row_spans(m.rows, m.block_rows)]
    merged = torch.cat(blocks).reshape(W.shape)
    return merged, (m.probe_error() if probe else None)


def merge_state_dict(state: Mapping[str, torch.Tensor], plan: Plan, out_dtype: str | None = None, *,
                     device: str = "cpu", probe: bool = False) -> tuple[dict, dict]:
    """Merge a plan into an in-memory state dict. Returns (new state dict, key -> probe error)."""
    new, errors = dict(state), {}
    for key, terms in plan.terms.items():
        new[key], e = merge_tensor(state[key], key, terms, out_dtype, device=device, probe=probe)
        if e is not None:
            errors[key] = e
    return new, errors


__all__ = ["Term", "Plan", "plan_merge", "Merger", "nonfinite_error", "can_fold", "probe_relative_error",
           "is_power_of_two", "merge_tensor", "merge_state_dict", "row_view_shape", "FLOAT_DTYPES", "BLOCK_BYTES"]
