"""How `extract` (ops/extract.py) reads its tensor pairs: lanes, reused buffers, and deltas built piece by piece.

Lanes: the pairs are taken in order by one thread per core (at most MAX_LANES), each of which reads its pair
and factorises it, with the BLAS held to a share of the cores per lane (`device.blas_threads`, threadpoolctl),
so that each core runs one product at a time: no core runs a reader and a product together, no BLAS thread
waits for another. On the 2-core machine of benchmarks/README.md this is about 1.5x faster end to end than
one reader thread beside products spread over both cores. With CUDA the lanes are the same: one lane reads
while the device factorises another lane's pair. The main thread is the first lane; where threadpoolctl
finds no BLAS to limit, there is one lane and the BLAS keeps its own threads.

A lane reads a pair through read-only mappings of windows of WINDOW_ELEMENTS elements (io.base
`mapped`: no copy of the bytes, which a pread of every piece cost; one unmapping per window, not per piece,
so few TLB shootdowns), in pieces of CHUNK_ELEMENTS elements: it widens both to float32 (ml_dtypes for bfloat16),
subtracts into a delta buffer and sums the squares while the piece is in the cache. When the caller passes
the sketch's test matrix, the pieces are whole rows and the first sketch M @ Omega is formed piece by piece
too, so that the delta is read from memory once less. Delta buffers come from a fixed set of slots (the
largest delta, and one of LANE_SLOT_BYTES or of the size most pairs need, whichever is larger, per further
lane), handed out in the order of the pairs, so that peak memory is bounded and the run cannot starve.
A matrix whose float32 delta is larger than the caller's budget gets no slot: it is a `StreamedDelta`, an
operator (ops/svd.py) that re-reads the pair in row blocks of at most the budget for every product of the
randomized SVD, so that the slots, and with them the peak memory, never exceed lanes x budget whatever the
largest matrix (an 8B model's 2.1 GB lm_head delta). Every pair's result depends on that pair alone, and
results are gathered in the order of the pairs: the output does not depend on the number of lanes. Errors
too: when pairs fail, the first failing pair in order is the one reported.

The entries handled here are ops.extract.Entry objects (key, shape, numel, ft_dtype, base_dtype, whole).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable

import numpy as np

from .. import device, dtypes
from .svd import sum_squares

CHUNK_ELEMENTS = 1 << 18  # a piece of a pair: 1 MiB of float32 delta, so that the passes over it stay in cache
WINDOW_ELEMENTS = 1 << 24  # the part of a pair mapped at once: 32 MiB of bf16 per file, whatever the tensor's size
LANE_SLOT_BYTES = 1 << 26  # each further lane's delta slot holds at least 64 MiB (every projection of a 1B model)
MAX_LANES = 4  # more lanes multiply the slots' memory; past 4 cores, each lane's products get more threads


def _blas_limitable() -> bool:
    """Whether threadpoolctl finds a BLAS whose threads it can limit (OpenBLAS, MKL, BLIS)."""
    from threadpoolctl import threadpool_info

    return any(lib.get("user_api") == "blas" for lib in threadpool_info())


def lane_plan() -> tuple[int, int | None]:
    """(lanes, BLAS threads per lane): one lane per core up to MAX_LANES, the cores shared among them; one lane
    and the BLAS's own threads (None) where there is a single core or the BLAS cannot be limited."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if cores < 2 or not _blas_limitable():
        return 1, None
    lanes = min(cores, MAX_LANES)
    return lanes, max(1, cores // lanes)


def _whole(e) -> bool:
    return e.whole


def slot_sizes(entries: list, lanes: int, whole: Callable[[Any], bool] = _whole) -> list[int]:
    """float32 elements of each delta slot: the largest delta, then one per further lane holding at least
    LANE_SLOT_BYTES, or the delta size that all but the largest eighth of the pairs fit (never more than the
    largest). Only the entries `whole(e)` says are read whole count (the default: e.whole)."""
    sizes = sorted((e.numel for e in entries if whole(e)), reverse=True)
    if not sizes:
        return []
    common = sizes[len(sizes) // 8]
    other = min(sizes[0], max(LANE_SLOT_BYTES // 4, common))
    return [sizes[0]] + [other] * (lanes - 1)


class Scratch:
    """One lane's piece buffer: the base's piece widened to float32."""

    def __init__(self):
        self.t = np.empty(CHUNK_ELEMENTS, np.float32)


def run_lanes(entries: list, handle: Callable[[Scratch, Any, Any], Any], lanes: int, sizes: list[int],
              tick: Callable[..., Any] = lambda **kw: None, whole: Callable[[Any], bool] = _whole) -> list:
    """handle(scratch, entry, delta) for every entry on `lanes` threads (the caller's is the first); returns
    the results in the order of `entries`.

    `delta` is a float32 buffer of entry.numel elements (a slot of `sizes`) for entries read whole
    (`whole(entry)`, the same predicate as `slot_sizes`'s), None for the others; it is handed back to the
    slots when `handle` returns, so a result must not keep it. Entries
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
                if not whole(entries[i]):
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
        scratch = Scratch()
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

@contextlib.contextmanager
def _pair(ft, base, key: str, start: int, stop: int):
    """Elements [start, stop) of the pair's two tensors as flat read-only arrays: mappings of the files where
    the readers can map them, so that no byte is copied before it is widened (a pread of every piece cost a
    copy of each)."""
    with ft.mapped(key, start, stop) as F, base.mapped(key, start, stop) as B:
        yield F, B


def _windows(numel: int, step: int) -> list[tuple[int, int]]:
    """[a0, a1) windows of at most about WINDOW_ELEMENTS covering a tensor, each a multiple of `step` (but the
    last): a pair is mapped one window at a time, so the pages it has mapped stay bounded."""
    win = max(step, (WINDOW_ELEMENTS // step) * step)
    return [(a0, min(numel, a0 + win)) for a0 in range(0, numel, win)]


def _spans(numel: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(step, numel - a)) for a in range(0, numel, step)]


def changed(ft, base, e, s: Scratch) -> bool:
    """Whether the pair differs bitwise (a dtype change counts as a change), compared piece by piece."""
    if e.ft_dtype != e.base_dtype:
        return True
    for a0, a1 in _windows(e.numel, CHUNK_ELEMENTS):
        with _pair(ft, base, e.key, a0, a1) as (F, B):
            differ = any(not np.array_equal(F[a:a + n].view(np.uint8), B[a:a + n].view(np.uint8))
                         for a, n in _spans(a1 - a0, CHUNK_ELEMENTS))
            del F, B
        if differ:
            return True
    return False


def sketch_fits(n: int) -> bool:
    """Whether rows of n values fit a piece, so that the first sketch can be formed while reading."""
    return n <= CHUNK_ELEMENTS


def _piece(F, B, a: int, d: np.ndarray, s: Scratch, cpu) -> float:
    """d = (F - B)[a:a + d.size] in float32 (d.size <= CHUNK_ELEMENTS) from the pair's flat arrays; returns
    ||d||^2."""
    n_el = d.size
    np.copyto(d, F[a:a + n_el], casting="unsafe")  # exact widening (F64 rounds)
    t = s.t[:n_el]
    np.copyto(t, B[a:a + n_el], casting="unsafe")
    np.subtract(d, t, out=d)
    return sum_squares(cpu, d)


def subtract(ft, base, e, delta: np.ndarray, s: Scratch, omega: np.ndarray | None = None):
    """delta = ft - base in float32, piece by piece; returns (||delta||^2, Y, W).

    With `omega` (n, l), the delta is a row-major (m, n) matrix (n <= CHUNK_ELEMENTS, `sketch_fits`) and the
    first pass of the randomized SVD (ops/svd.py `project`) is made on the pieces while they are in cache:
    Y = delta @ omega (m, l) and W = Y^T delta (l, n), summed over the pieces in order; otherwise Y and W are
    None. The energy is summed in piece order (float64). Bitwise equality is not tested here: an unchanged
    pair has a zero delta, which the caller counts as unchanged."""
    cpu = device.cpu()
    Y = W = part = None
    step = CHUNK_ELEMENTS
    if omega is not None:
        n, l = omega.shape
        Y = np.empty((e.numel // n, l), np.float32)
        W, part = np.zeros((l, n), np.float32), np.empty((l, n), np.float32)
        step = (CHUNK_ELEMENTS // n) * n
    energy = 0.0
    for a0, a1 in _windows(e.numel, step):
        with _pair(ft, base, e.key, a0, a1) as (F, B):
            for a, n_el in _spans(a1 - a0, step):
                d = delta[a0 + a:a0 + a + n_el]
                energy += _piece(F, B, a, d, s, cpu)
                if Y is not None:
                    rows = d.reshape(-1, omega.shape[0])
                    r0 = (a0 + a) // omega.shape[0]
                    Yi = Y[r0:r0 + rows.shape[0]]
                    np.matmul(rows, omega, out=Yi)  # (rows, n) @ (n, l) -> (rows, l)
                    W += np.matmul(Yi.T, rows, out=part)  # (l, rows) @ (rows, n) -> (l, n)
            del F, B
    return energy, Y, W


# ---- a pair too large to hold: an operator that re-reads it -------------------------------------------------------

def _add(acc, P):
    acc += P
    return acc


class StreamedDelta:
    """The matrix view M (m, n) of a pair's float32 delta as an operator of ops/svd.py (`.shape`, `.dtype`,
    `.matmul`, `.rmatmul`, `.residual_squares`), never held whole: every product re-reads the pair from the
    files in row blocks of at most `block_elements` (each block read piece by piece as `subtract` reads: mapped,
    widen, subtract) and combines the blocks' products.

    The blocks are rows of the tensor as stored, W (rows, cols) with cols the product of the other dimensions:
    for the layouts "linear" and "conv" M = W, so M @ X is the concatenation of the blocks' W_i @ X and
    Qt @ M the sum of Qt[:, i] @ W_i; for "fan_in_fan_out" and "embedding" M = W^T, so M @ X is the sum of
    (X_i^T W_i)^T and Qt @ M the concatenation of (W_i Qt^T)^T. Sums run in block order, so a product is
    deterministic; it differs from the GEMM of the whole matrix only by float32 rounding. `project` forms
    M @ X and its Y^T M together, on each block while it is in memory.

    `energy` is ||M||_F^2 (float64 sum of the pieces'), set by every full pass; the first product gives it.
    """

    def __init__(self, dev, ft, base, e, scratch: Scratch, block_elements: int):
        self.dev, self.ft, self.base, self.e, self.s = dev, ft, base, e, scratch
        self.shape = tuple(e.matrix_shape)
        self.dtype = np.float32
        self.transposed = e.layout in ("fan_in_fan_out", "embedding")
        self.rows = int(e.shape[0])
        self.cols = e.numel // self.rows
        self.block_rows = max(1, min(self.rows, int(block_elements) // self.cols))
        self.block = np.empty(self.block_rows * self.cols, np.float32)
        self.energy: float | None = None

    def _blocks(self):
        """(r0, W_i) for the row blocks of the delta, W_i (rows_i, cols) a float32 array of the device (the
        block buffer itself on the CPU, so it is valid until the next block)."""
        cpu = device.cpu()
        energy = 0.0
        for r0 in range(0, self.rows, self.block_rows):
            r = min(self.block_rows, self.rows - r0)
            W = self.block[:r * self.cols]
            with _pair(self.ft, self.base, self.e.key, r0 * self.cols, (r0 + r) * self.cols) as (F, B):
                for a, n_el in _spans(W.size, CHUNK_ELEMENTS):
                    energy += _piece(F, B, a, W[a:a + n_el], self.s, cpu)
                del F, B
            yield r0, self.dev.asarray(W.reshape(r, self.cols))
        self.energy = energy

    def matmul(self, X):
        """M @ X: (m, n) @ (n, l) -> (m, l)."""
        dev = self.dev
        if self.transposed:  # M @ X = W^T X = sum_i (X_i^T W_i)^T
            acc = None
            for r0, W in self._blocks():
                P = dev.matmul(X[r0:r0 + W.shape[0]].T, W)  # (l, rows_i) @ (rows_i, cols) -> (l, cols)
                acc = P if acc is None else _add(acc, P)
            return acc.T
        out = dev.empty((self.rows, X.shape[1]))
        for r0, W in self._blocks():
            dev.matmul(W, X, out=out[r0:r0 + W.shape[0]])  # (rows_i, cols) @ (cols, l) -> (rows_i, l)
        return out

    def rmatmul(self, Qt):
        """Qt @ M: (l, m) @ (m, n) -> (l, n)."""
        dev = self.dev
        if self.transposed:  # Qt @ W^T = (W Qt^T)^T, W's row blocks giving row blocks of W Qt^T
            out = dev.empty((self.rows, Qt.shape[0]))
            for r0, W in self._blocks():
                dev.matmul(W, Qt.T, out=out[r0:r0 + W.shape[0]])  # (rows_i, cols) @ (cols, l) -> (rows_i, l)
            return out.T
        acc = None
        for r0, W in self._blocks():
            P = dev.matmul(Qt[:, r0:r0 + W.shape[0]], W)  # (l, rows_i) @ (rows_i, cols) -> (l, cols)
            acc = P if acc is None else _add(acc, P)
        return acc

    def project(self, X):
        """(Y, Y^T M) with Y = M @ X: (m, l), (l, n); for "linear" and "conv" both from one read of the pair
        (each block's Y_i = W_i X, then Y_i^T W_i summed), for the transposed layouts two reads (Y must be
        whole before Y^T M)."""
        if self.transposed:
            Y = self.matmul(X)
            return Y, self.rmatmul(Y.T)
        dev = self.dev
        Y = dev.empty((self.rows, X.shape[1]))
        acc = None
        for r0, W in self._blocks():
            Yi = Y[r0:r0 + W.shape[0]]
            dev.matmul(W, X, out=Yi)  # (rows_i, cols) @ (cols, l) -> (rows_i, l)
            P = dev.matmul(Yi.T, W)  # (l, rows_i) @ (rows_i, cols) -> (l, cols)
            acc = P if acc is None else _add(acc, P)
        return Y, acc

    def residual_squares(self, B, A) -> float:
        """||M - B A||_F^2 for B (m, k), A (k, n), block by block (float64 sum of float32 blocks)."""
        dev = self.dev
        total = 0.0
        for r0, W in self._blocks():
            r = W.shape[0]
            if self.transposed:  # (M - B A)^T rows: W_i - A[:, i]^T B^T
                R = dev.matmul(A[:, r0:r0 + r].T, B.T)  # (rows_i, k) @ (k, cols) -> (rows_i, cols)
            else:
                R = dev.matmul(B[r0:r0 + r], A)  # (rows_i, k) @ (k, cols) -> (rows_i, cols)
            R -= W
            total += sum_squares(dev, R)
        return total


__all__ = ["CHUNK_ELEMENTS", "LANE_SLOT_BYTES", "MAX_LANES", "lane_plan", "slot_sizes", "Scratch", "run_lanes",
           "changed", "sketch_fits", "subtract",
           "StreamedDelta"]
