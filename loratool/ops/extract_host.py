"""The CPU route of `extract` (ops/extract.py) on numpy: no `import torch`, numpy's BLAS for the products.

One tensor pair at a time: both are mapped from the page cache in 2 MiB pieces (pread where a source cannot
be mapped), widened to float32 and subtracted into a reused delta buffer by one thread per core, and the sum
of squares is formed piece by piece while the piece is in cache; a reader thread prepares the next pair while
this one is factorised. Then the randomized (or exact) SVD of ops/svd_host.py, and the factors, cast once to
the output dtype, as hostarray.HostTensors. The numerics are those of ops/extract.py's module docstring.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..adapter import Target
from ..hostarray import NP_DTYPES, HostTensor, first_nonfinite, from_f32, to_f32
from .extract import (ENERGY_START_RANK, OUT_DTYPES, Entry, ExtractOptions, _check_finite, _Factors, _fixed_rank, _p,
                      _select, budget_finish, factor_report, full_target, overflow_error, read_ahead,
                      residual_squares_by_rows, triage)
from .svd_host import exact_svd, prefers_exact, quantile, randomized_svd, seed_for, sketch_size, \
    sum_squares

_CHUNK_ELEMENTS = 1 << 19  # pieces of a pair read, subtracted and summed at once: 2 MiB of float32, so that the
# passes over a piece stay in the cache (0.3-0.6 s faster end to end than 4M-element pieces, benchmarks/README.md)


AHEAD_BYTES = 1 << 26  # the read-ahead slot: deltas up to 64 MiB (every projection of an 8B model but the head)


class _Reader:
    """Yields (entry, delta, changed, energy) per entry; hand each delta back with `release(delta)`.

    `delta` (flat float32 ft - base) lives in one of two slots: one of the largest delta's size, one of at most
    AHEAD_BYTES. With `ahead`, a thread reads the next pair into the free slot while the caller factorises the
    current one (reading is memory-bound, the products compute-bound: they share two cores well), so peak
    memory is the largest delta plus 64 MiB. The pieces of a pair are mapped, subtracted and summed by one
    thread per core (mmap reads and numpy release the GIL); the energy is summed in piece order, so the result
    does not depend on the threads. (The first sketch M @ Omega is one product afterwards: numpy's BLAS runs it
    faster than piece by piece here.)"""

    def __init__(self, ft, base, entries: list[Entry], workers: int | None = None, ahead: bool = True):
        self.ft, self.base, self.entries = ft, base, entries
        biggest = max((e.numel for e in entries if e.whole), default=0)
        self.slots = [np.empty(biggest, np.float32)]
        if ahead and biggest:
            self.slots.append(np.empty(min(biggest, AHEAD_BYTES // 4), np.float32))
        self.free = list(range(len(self.slots)))
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._local = threading.local()

    def _bufs(self):
        b = getattr(self._local, "bufs", None)
        if b is None:  # per thread: two raw buffers (8-byte dtypes at most) and a float32 one
            b = self._local.bufs = (np.empty(_CHUNK_ELEMENTS * 8, np.uint8), np.empty(_CHUNK_ELEMENTS * 8, np.uint8),
                                    np.empty(_CHUNK_ELEMENTS, np.float32))
        return b

    @contextlib.contextmanager
    def _raw(self, src, key: str, dtype: str, start: int, n: int, buf):
        """Elements [start, start + n) of a tensor as raw numpy values: a read-only mapping of just those bytes
        of the page cache when the source can say where they are (no copy; unmapped right after), else a
        pread into `buf`."""
        size = np.dtype(NP_DTYPES[dtype]).itemsize
        where = src.locate(key) if hasattr(src, "locate") else None
        if where is None or n * size < mmap.ALLOCATIONGRANULARITY:
            raw = buf[:n * size]
            src.read_bytes_into(key, memoryview(raw), start)
            yield raw.view(NP_DTYPES[dtype])
            return
        fd, offset, _ = where
        pos = offset + start * size
        lo = pos - pos % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(fd, pos + n * size - lo, access=mmap.ACCESS_READ, offset=lo)
        try:
            view = memoryview(mm)[pos - lo:]
            arr = np.frombuffer(view, dtype=NP_DTYPES[dtype], count=n)
            yield arr
            del arr
            view.release()
        finally:
            with contextlib.suppress(BufferError):  # a view kept by a traceback: closed when collected
                mm.close()

    def _read(self, e: Entry, start: int, n: int):
        fbuf, bbuf, tmp = self._bufs()
        stack = contextlib.ExitStack()
        f = stack.enter_context(self._raw(self.ft, e.key, e.ft_dtype, start, n, fbuf))
        b = stack.enter_context(self._raw(self.base, e.key, e.base_dtype, start, n, bbuf))
        return stack, f, b, tmp[:n]

    def _compare(self, e: Entry, start: int, n: int) -> bool:
        stack, f, b, _ = self._read(e, start, n)
        with stack:
            return e.ft_dtype != e.base_dtype or not np.array_equal(f.view(np.uint8), b.view(np.uint8))

    def _subtract(self, e: Entry, start: int, n: int, delta) -> float:
        """delta[start:start + n] = ft - base in float32; returns its sum of squares.

        Bitwise equality is not tested here: an unchanged pair has a zero delta, which the caller counts as
        unchanged; only a pair whose difference is not finite is compared afterwards, to tell NaNs in the same
        places (unchanged) from a real non-finite difference."""
        stack, f, b, t = self._read(e, start, n)
        d = delta[start:start + n]
        with stack:
            to_f32(f, e.ft_dtype, d)
            to_f32(b, e.base_dtype, t)
            np.subtract(d, t, out=d)
        return sum_squares(d)

    def _slot(self, numel: int) -> int | None:
        """A free slot that holds `numel` float32 values (the smallest that does), waiting for one; None when
        stopped."""
        with self.cond:
            while True:
                fits = [i for i in self.free if self.slots[i].size >= numel]
                if fits:
                    i = min(fits, key=lambda j: self.slots[j].size)
                    self.free.remove(i)
                    return i
                if self.stop.is_set():
                    return None
                self.cond.wait(0.1)

    def release(self, delta) -> None:
        """Hand a delta's slot back to the reader."""
        if delta is None:
            return
        with self.cond:
            for i, buf in enumerate(self.slots):
                if np.shares_memory(buf, delta):
                    self.free.append(i)
            self.cond.notify_all()

    def _produce(self):
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for e in self.entries:
                spans = [(a, min(_CHUNK_ELEMENTS, e.numel - a)) for a in range(0, e.numel, _CHUNK_ELEMENTS)]
                if not e.whole:
                    yield e, None, any(pool.map(lambda p: self._compare(e, *p), spans)), None
                    continue
                i = self._slot(e.numel)
                if i is None:
                    return
                delta = self.slots[i][:e.numel]
                E = math.fsum(pool.map(lambda p: self._subtract(e, *p, delta), spans))  # in piece order
                if not math.isfinite(E) and not any(pool.map(lambda p: self._compare(e, *p), spans)):
                    self.release(delta)
                    yield e, None, False, None  # NaN or Inf in the same places of both: unchanged
                    continue
                yield e, delta, True, E

    def __iter__(self):
        if len(self.slots) < 2:
            return self._produce()
        return read_ahead(self._produce, self.stop)


def _view(e: Entry, flat: np.ndarray) -> np.ndarray:
    """The (out, in) matrix view of a flat delta in the base tensor's layout (adapter.py docstring)."""
    W = flat.reshape(e.shape)
    if e.layout in ("fan_in_fan_out", "embedding"):
        return W.T
    return W.reshape(e.matrix_shape)


def factorize(M: np.ndarray, e: Entry, E: float, opts: ExtractOptions) -> _Factors:
    """Top singular triplets of the matrix view M (m, n), enough for the rank rule (see ops.extract_torch)."""
    m, n = M.shape
    seed = seed_for(opts.seed, e.key)
    k = _fixed_rank(opts)
    if k is not None:
        k = min(k, m, n)
        l = sketch_size(k, m, n, opts.oversample)
        if prefers_exact(l, m, n):
            return _Factors(e, *exact_svd(M), E, "exact")
        return _Factors(e, *randomized_svd(M, l, seed, _p(opts)), E, "randomized")
    kk = min(ENERGY_START_RANK, m, n)
    while True:  # adaptive ranks: grow the sketch x4 until the rule is decided
        l = sketch_size(kk, m, n, opts.oversample)
        if prefers_exact(l, m, n):
            return _Factors(e, *exact_svd(M), E, "exact")
        U, S, Vh = randomized_svd(M, l, seed, _p(opts))
        if _select(S, E, opts, complete=False) is not None:
            return _Factors(e, U, S, Vh, E, "randomized")
        kk *= 4


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


def run(ft, base, entries: list[Entry], opts: ExtractOptions, names, tick):
    """The numpy route of ops.extract.extract: returns (done, full targets, not extracted, unchanged, dropped)."""
    full_targets: list[Target] = []
    pending: list[_Factors] = []  # budget mode: factors waiting for the global rank choice
    done: dict[str, tuple] = {}  # key -> (B, A, report)
    not_extracted: list[dict] = []
    unchanged = 0
    budget = opts.max_params is not None

    reader = _Reader(ft, base, entries)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite deltas are refused by name below
        for e, Mf, changed, E in reader:
            try:
                tick(advance=1)
                fate = triage(e, changed, not_extracted)
                if fate == "unchanged":
                    unchanged += 1
                if fate is not None:
                    continue
                _check_finite(e, E, names)
                if E == 0.0 or e.role == "full":
                    if E > 0.0:
                        delta = _cast(Mf.reshape(e.shape), OUT_DTYPES[opts.dtype])
                        err = math.sqrt(sum_squares(delta.float32().reshape(-1) - Mf) / E)
                        full_targets.append(full_target(e, delta, E, err))
                    else:  # bitwise different, numerically equal (-0.0 and 0.0, or a dtype change)
                        unchanged += 1
                    continue
                M = _view(e, Mf)
                f = factorize(M, e, E, opts)
                if budget:  # keep the cap's triplets; the global budget picks the ranks at the end
                    kcap = min(_fixed_rank(opts), *e.matrix_shape)
                    f.U, f.S, f.Vh = np.array(f.U[:, :kcap]), np.array(f.S[:kcap]), np.array(f.Vh[:kcap])
                    pending.append(f)
                    continue
                k = min(opts.rank, *e.matrix_shape) if opts.rank is not None else _select(f.S, E, opts, complete=True)
                done[e.key] = finish(f, k, opts, M)
            finally:
                reader.release(Mf)  # the slot goes back to the read-ahead

        dropped: list[str] = []
        if budget:
            redo, dropped = budget_finish(pending, opts, done, not_extracted, finish)
            if redo:  # re-read the pairs whose error must be measured on the final (clamped or cast) factors
                by_key = {f.entry.key: (f, k) for f, k in redo}
                again = _Reader(ft, base, [f.entry for f, _ in redo], ahead=False)
                for e, Mf, _, _ in again:
                    f, k = by_key[e.key]
                    done[e.key] = finish(f, k, opts, _view(e, Mf))
                    again.release(Mf)
    return done, full_targets, not_extracted, unchanged, dropped


__all__ = ["run", "factorize", "finish", "residual_squares"]
