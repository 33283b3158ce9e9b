"""The CPU route of `extract` (ops/extract.py) on numpy: no `import torch`, numpy's BLAS for the products.

Lanes: the pairs are taken in order by one thread per core (at most MAX_LANES), each of which reads its pair
and factorises it, with numpy's BLAS held to one thread per lane (ops/blas_threads.py), so that each core
runs one product at a time: no core runs a reader and a product together, no BLAS thread waits for another.
On the 2-core machine of benchmarks/README.md this is about 1.5x faster end to end than one reader thread
beside products spread over both cores. The main thread is the first lane; where the BLAS's threads cannot
be set, there is one lane and the BLAS keeps its own threads.

A lane reads a pair in pieces of about _CHUNK_ELEMENTS elements (pread into the lane's buffers; a mapping
of the file would cost each lane page faults and TLB shootdowns), widens both to float32, subtracts into a
delta buffer and sums the squares while the piece is in the cache. For a randomized SVD of a row-major
matrix view, the pieces are whole rows and the first sketch M @ Omega is formed piece by piece there too, so
that the delta is read from memory once less. Delta buffers come from a fixed set of slots (the largest
delta, and one of LANE_SLOT_BYTES or of the size most pairs need, whichever is larger, per further lane),
handed out in the order of the pairs, so that peak memory is bounded and the run cannot starve. Every pair's result
depends on that pair alone, and results are gathered in the order of the pairs: the output does not depend
on the number of lanes. Errors too: when pairs fail, the first failing pair in order is the one reported.

Then the randomized (or exact) SVD of ops/svd_host.py, and the factors, cast once to the output dtype, as
hostarray.HostTensors. The numerics are those of ops/extract.py's module docstring.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Callable

import numpy as np

from ..adapter import Target
from ..hostarray import NP_DTYPES, HostTensor, first_nonfinite, from_f32, to_f32
from . import blas_threads
from .extract import (ENERGY_START_RANK, OUT_DTYPES, Entry, ExtractOptions, _check_finite, _Factors, _fixed_rank, _p,
                      _select, budget_finish, factor_report, full_target, overflow_error, residual_squares_by_rows,
                      triage)
from .svd_host import exact_svd, gaussian_sketch, prefers_exact, quantile, randomized_svd, seed_for, \
    sketch_size, sum_squares

_CHUNK_ELEMENTS = 1 << 18  # a piece of a pair: 1 MiB of float32 delta, so that the passes over it stay in cache
LANE_SLOT_BYTES = 1 << 26  # each further lane's delta slot holds at least 64 MiB (every projection of a 1B model)
MAX_LANES = 4  # more lanes multiply the slots' memory; past 4 cores, each lane's products get more threads


def lane_plan() -> tuple[int, int | None]:
    """(lanes, BLAS threads per lane): one lane per core up to MAX_LANES, the cores shared among them; one lane
    and the BLAS's own threads (None) where there is a single core or the BLAS cannot be told."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if cores < 2 or not blas_threads.controllable():
        return 1, None
    lanes = min(cores, MAX_LANES)
    return lanes, max(1, cores // lanes)


def slot_sizes(entries: list[Entry], lanes: int) -> list[int]:
    """float32 elements of each delta slot: the largest delta, then one per further lane holding at least
    LANE_SLOT_BYTES, or the delta size that all but the largest eighth of the pairs fit (never more than the
    largest)."""
    sizes = sorted((e.numel for e in entries if e.whole), reverse=True)
    if not sizes:
        return []
    common = sizes[len(sizes) // 8]
    other = min(sizes[0], max(LANE_SLOT_BYTES // 4, common))
    return [sizes[0]] + [other] * (lanes - 1)


class _Scratch:
    """One lane's piece buffers: two raw ones (8-byte dtypes at most) and a float32 one."""

    def __init__(self):
        self.f = np.empty(_CHUNK_ELEMENTS * 8, np.uint8)
        self.b = np.empty(_CHUNK_ELEMENTS * 8, np.uint8)
        self.t = np.empty(_CHUNK_ELEMENTS, np.float32)


def run_lanes(entries: list[Entry], handle: Callable[[_Scratch, Entry, Any], Any], lanes: int,
              sizes: list[int], tick: Callable[..., Any] = lambda **kw: None) -> list:
    """handle(scratch, entry, delta) for every entry on `lanes` threads (the caller's is the first); returns
    the results in the order of `entries`.

    `delta` is a float32 buffer of entry.numel elements (a slot of `sizes`) for entries read whole, None for
    the others; it is handed back to the slots when `handle` returns, so a result must not keep it. Entries
    are claimed in order, and a lane waits for a slot that fits before claiming, so that slots are handed out
    in order too (the largest slot always comes free). After an error, no further entry is claimed, the lanes
    finish the entries they hold, and the error of the first failing entry in order is raised."""
    slots = [np.empty(s, np.float32) for s in sizes]
    free = list(range(len(slots)))
    cond = threading.Condition()
    out: list = [None] * len(entries)
    errors: dict[int, BaseException] = {}
    pos = [0]
    stop = threading.Event()
    ticking = threading.Lock()

    def claim():
        with cond:
            while True:
                i = pos[0]
                if stop.is_set() or i >= len(entries):
                    return None
                if not entries[i].whole:
                    pos[0] += 1
                    return i, None
                fits = [j for j in free if slots[j].size >= entries[i].numel]
                if fits:
                    j = min(fits, key=lambda x: slots[x].size)
                    free.remove(j)
                    pos[0] += 1
                    return i, j
                cond.wait()

    def lane():
        scratch = _Scratch()
        while (c := claim()) is not None:
            i, j = c
            e = entries[i]
            try:
                out[i] = handle(scratch, e, None if j is None else slots[j][:e.numel])
                with ticking:
                    tick(advance=1)
            except BaseException as exc:  # raised in the caller's thread, in entry order
                with cond:
                    errors[i] = exc
                    stop.set()
                    cond.notify_all()
                if isinstance(exc, KeyboardInterrupt):  # the caller's lane was interrupted: it wins over errors
                    raise
                return
            finally:
                if j is not None:
                    with cond:
                        free.append(j)
                        cond.notify_all()

    threads = [threading.Thread(target=lane, name=f"loratool-extract-lane-{n}", daemon=True)
               for n in range(1, max(1, lanes))]
    for t in threads:
        t.start()
    try:
        lane()
        for t in threads:
            t.join()
    except BaseException:  # an interrupt: the other lanes finish the pairs they hold, then stop
        stop.set()
        with cond:
            cond.notify_all()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[min(errors)]
    return out


# ---- reading a pair ---------------------------------------------------------------------------------------------

def _raw(src, key: str, dtype: str, start: int, n: int, buf: np.ndarray) -> np.ndarray:
    """Elements [start, start + n) of a tensor as raw numpy values, read into `buf`."""
    raw = buf[:n * np.dtype(NP_DTYPES[dtype]).itemsize]
    src.read_bytes_into(key, memoryview(raw), start)
    return raw.view(NP_DTYPES[dtype])


def _spans(numel: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(step, numel - a)) for a in range(0, numel, step)]


def _changed(ft, base, e: Entry, s: _Scratch) -> bool:
    """Whether the pair differs bitwise (a dtype change counts as a change), compared piece by piece."""
    if e.ft_dtype != e.base_dtype:
        return True
    for a, n in _spans(e.numel, _CHUNK_ELEMENTS):
        f = _raw(ft, e.key, e.ft_dtype, a, n, s.f)
        b = _raw(base, e.key, e.base_dtype, a, n, s.b)
        if not np.array_equal(f.view(np.uint8), b.view(np.uint8)):
            return True
    return False


def first_sketch(e: Entry, opts: ExtractOptions) -> int | None:
    """Columns of the first randomized sketch of this matrix, or None when its SVD is exact."""
    m, n = e.matrix_shape
    k = _fixed_rank(opts)
    kk = min(k if k is not None else ENERGY_START_RANK, m, n)
    l = sketch_size(kk, m, n, opts.oversample)
    return None if prefers_exact(l, m, n) else l


def _subtract(ft, base, e: Entry, delta: np.ndarray, s: _Scratch, opts: ExtractOptions, sketch: bool = True):
    """delta = ft - base in float32, piece by piece; returns (||delta||^2, Y) with Y = M @ Omega, the first
    sketch of the matrix view M (formed on the pieces while they are in cache), or None where the pieces are
    not whole rows of M (transposed layouts, rows longer than a piece) or the SVD will be exact.

    The energy is summed in piece order (float64). Bitwise equality is not tested here: an unchanged pair
    has a zero delta, which the caller counts as unchanged."""
    Y = omega = None
    step = _CHUNK_ELEMENTS
    if sketch and e.role == "matrix" and e.layout in ("linear", "conv"):
        m, n = e.matrix_shape
        l = first_sketch(e, opts) if n <= _CHUNK_ELEMENTS else None
        if l is not None:
            omega = gaussian_sketch(n, l, seed_for(opts.seed, e.key))  # the one randomized_svd would draw
            Y = np.empty((m, l), np.float32)
            step = (_CHUNK_ELEMENTS // n) * n
    energy = 0.0
    for a, n_el in _spans(e.numel, step):
        d = delta[a:a + n_el]
        to_f32(_raw(ft, e.key, e.ft_dtype, a, n_el, s.f), e.ft_dtype, d)
        t = s.t[:n_el]
        to_f32(_raw(base, e.key, e.base_dtype, a, n_el, s.b), e.base_dtype, t)
        np.subtract(d, t, out=d)
        energy += sum_squares(d)
        if Y is not None:
            rows = d.reshape(-1, omega.shape[0])  # (rows, n) @ (n, l) -> (rows, l)
            r0 = a // omega.shape[0]
            np.matmul(rows, omega, out=Y[r0:r0 + rows.shape[0]])
    return energy, Y


def _view(e: Entry, flat: np.ndarray) -> np.ndarray:
    """The (out, in) matrix view of a flat delta in the base tensor's layout (adapter.py docstring)."""
    W = flat.reshape(e.shape)
    if e.layout in ("fan_in_fan_out", "embedding"):
        return W.T
    return W.reshape(e.matrix_shape)


# ---- factorising --------------------------------------------------------------------------------------------------

def factorize(M: np.ndarray, e: Entry, E: float, opts: ExtractOptions, Y: np.ndarray | None = None) -> _Factors:
    """Top singular triplets of the matrix view M (m, n), enough for the rank rule (see ops.extract_torch).
    `Y`: the first sketch M @ Omega when already formed (see _subtract)."""
    m, n = M.shape
    seed = seed_for(opts.seed, e.key)
    l = first_sketch(e, opts)
    if l is None:
        return _Factors(e, *exact_svd(M), E, "exact")
    if _fixed_rank(opts) is not None:
        return _Factors(e, *randomized_svd(M, l, seed, _p(opts), Y=Y), E, "randomized")
    kk = min(ENERGY_START_RANK, m, n)
    while True:  # adaptive ranks: grow the sketch x4 until the rule is decided
        U, S, Vh = randomized_svd(M, l, seed, _p(opts), Y=Y)
        if _select(S, E, opts, complete=False) is not None:
            return _Factors(e, U, S, Vh, E, "randomized")
        kk *= 4
        l, Y = sketch_size(kk, m, n, opts.oversample), None
        if prefers_exact(l, m, n):
            return _Factors(e, *exact_svd(M), E, "exact")


def _cast(x: np.ndarray, dtype: str) -> HostTensor:
    """float32 values cast once to the output dtype (safetensors name), rounding to nearest even."""
    out = np.empty(x.shape, NP_DTYPES[dtype])
    with np.errstate(over="ignore"):  # an overflow becomes Inf and is refused by the caller
        from_f32(np.ascontiguousarray(x, dtype=np.float32), dtype, out)
    return HostTensor(out, dtype)


def finish(f: _Factors, k: int, opts: ExtractOptions, M: np.ndarray | None = None):
    """Truncate to rank k, clamp and cast; measure the error. Returns (B, A, report), B and A HostTensors."""
    e = f.entry
    B = f.U[:, :k] * f.S[:k]  # (m, k) * (k,) -> (m, k): B = U diag(S)
    A = np.array(f.Vh[:k])  # (k, n); a copy, so the sketch's (l, n) storage is not kept alive
    if opts.clamp_quantile is not None and k > 0:
        hi = quantile(np.concatenate([B.reshape(-1), A.reshape(-1)]), opts.clamp_quantile)
        B, A = np.clip(B, -hi, hi), np.clip(A, -hi, hi)
    st = OUT_DTYPES[opts.dtype]
    B, A = _cast(B, st), _cast(A, st)
    if first_nonfinite(np.asarray(B), st) is not None or first_nonfinite(np.asarray(A), st) is not None:
        raise overflow_error(e, opts)
    residual = None if M is None else (lambda: residual_squares(M, B.float32(), A.float32()))
    return B, A, factor_report(f, k, opts, residual)


def residual_squares(M: np.ndarray, B: np.ndarray, A: np.ndarray) -> float:
    """||M - B A||_F^2, by row blocks of about _CHUNK_ELEMENTS elements (never a second m x n buffer)."""
    return residual_squares_by_rows(M, B, A, sum_squares, _CHUNK_ELEMENTS)


# ---- the run ---------------------------------------------------------------------------------------------------

def _pair(ft, base, opts: ExtractOptions, names, budget: bool):
    """The lanes' work on one pair: returns what becomes of it, as (kind, value) with kind one of
    "unchanged", "listed" (value: the not_extracted record), "full" (a Target), "done" ((B, A, report)) and
    "pending" (factors for the global budget)."""

    def handle(s: _Scratch, e: Entry, delta):
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite deltas are refused by name below
            if delta is None:
                listed: list[dict] = []
                fate = triage(e, _changed(ft, base, e, s), listed)
                return ("unchanged", None) if fate == "unchanged" else ("listed", listed[0])
            E, Y = _subtract(ft, base, e, delta, s, opts)
            if not math.isfinite(E) and not _changed(ft, base, e, s):
                return "unchanged", None  # NaN or Inf in the same places of both
            if E == 0.0:  # bitwise equal, or numerically (-0.0 and 0.0, a dtype change)
                return "unchanged", None
            _check_finite(e, E, names)
            if e.role == "full":
                d = _cast(delta.reshape(e.shape), OUT_DTYPES[opts.dtype])
                err = math.sqrt(sum_squares(d.float32().reshape(-1) - delta) / E)
                return "full", full_target(e, d, E, err)
            M = _view(e, delta)
            f = factorize(M, e, E, opts, Y)
            if budget:  # keep the cap's triplets; the global budget picks the ranks at the end
                kcap = min(_fixed_rank(opts), *e.matrix_shape)
                f.U, f.S, f.Vh = np.array(f.U[:, :kcap]), np.array(f.S[:kcap]), np.array(f.Vh[:kcap])
                return "pending", f
            k = min(opts.rank, *e.matrix_shape) if opts.rank is not None else _select(f.S, E, opts, complete=True)
            return "done", finish(f, k, opts, M)

    return handle


def run(ft, base, entries: list[Entry], opts: ExtractOptions, names, tick):
    """The numpy route of ops.extract.extract: returns (done, full targets, not extracted, unchanged, dropped)."""
    full_targets: list[Target] = []
    pending: list[_Factors] = []  # budget mode: factors waiting for the global rank choice
    done: dict[str, tuple] = {}  # key -> (B, A, report)
    not_extracted: list[dict] = []
    unchanged = 0
    budget = opts.max_params is not None
    lanes, per_lane = lane_plan()
    with blas_threads.limit(per_lane) if per_lane else contextlib.nullcontext():
        outcomes = run_lanes(entries, _pair(ft, base, opts, names, budget), lanes, slot_sizes(entries, lanes), tick)
        for e, (kind, value) in zip(entries, outcomes):
            if kind == "unchanged":
                unchanged += 1
            elif kind == "listed":
                not_extracted.append(value)
            elif kind == "full":
                full_targets.append(value)
            elif kind == "pending":
                pending.append(value)
            else:
                done[e.key] = value

        dropped: list[str] = []
        if budget:
            redo, dropped = budget_finish(pending, opts, done, not_extracted, finish)
            if redo:  # re-read the pairs whose error must be measured on the final (clamped or cast) factors
                by_key = {f.entry.key: (f, k) for f, k in redo}
                again = [f.entry for f, _ in redo]

                def measure(s: _Scratch, e: Entry, delta):
                    f, k = by_key[e.key]
                    with np.errstate(over="ignore", invalid="ignore"):
                        _subtract(ft, base, e, delta, s, opts, sketch=False)
                        return finish(f, k, opts, _view(e, delta))

                for e, value in zip(again, run_lanes(again, measure, lanes, slot_sizes(again, lanes))):
                    done[e.key] = value
    return done, full_targets, not_extracted, unchanged, dropped
