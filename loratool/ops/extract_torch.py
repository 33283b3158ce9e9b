"""The torch route of `extract` (ops/extract.py): CUDA, and the batched code path on the CPU.

Streaming reader with an arena (read ahead in a thread on CUDA, where the CPU is otherwise idle),
batched randomized SVDs of same-shaped matrices on the device (ops/svd.py), factors finished on the device
and returned on the CPU as torch tensors. The numerics are those of the module docstring of ops/extract.py.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Callable

import numpy as np
import torch

from ..adapter import Target
from ..container import torch_dtype
from .extract import (ENERGY_START_RANK, OUT_DTYPES, Entry, ExtractOptions, _check_finite, _Factors, _fixed_rank, _p,
                      _select, budget_finish, factor_report, full_target, overflow_error,
                      residual_squares_by_rows, triage)
from .linalg import from_base_layout
from .svd import exact_svd, prefers_exact, quantile, randomized_svd, resolve_device, seed_for, \
    sketch_size

# ---- streaming reader ----------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 22  # a pair is read, compared and subtracted in pieces of this many elements
_ARENA_MIN_BYTES = 1 << 27  # the deltas read ahead share an arena of at least 128 MiB (more for a bigger matrix)
_ALIGN = 64
# Read and subtract in a thread while the previous pair is factorised: on for CUDA, where the CPU is free
# while the GPU computes. On the CPU both sides compete for the same cores, and reading in line measured
# 0.3-1.0 s faster on the 1.1 B benchmark (benchmarks/README.md). None: that automatic choice.
READ_AHEAD: bool | None = None


def _same_bits(f: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two pieces of the same dtype (numpy's compare runs at memory speed; torch.equal
    is several times slower). Pieces of different dtypes count as different: the delta's norm decides."""
    if f.dtype != b.dtype:
        return False
    fb, bb = f.view(torch.uint8).numpy(), b.view(torch.uint8).numpy()
    if fb.size % 8 == 0:
        fb, bb = fb.view("u8"), bb.view("u8")
    return bool(np.array_equal(fb, bb))


class _Arena:
    """One float32 buffer the reader carves deltas from in FIFO order (a ring), so that read-ahead costs
    no allocation per tensor and the resident memory stays at the arena's size."""

    def __init__(self, nbytes: int, pin: bool):
        self.size = nbytes
        self.buf = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=pin)
        self.live: list[tuple[int, int]] = []  # (start, stop) in bytes, in allocation order
        self.head = 0
        self.cond = threading.Condition()

    def _place(self, n: int) -> int | None:
        if not self.live:
            return 0 if n <= self.size else None
        tail = self.live[0][0]
        if self.head > tail or (self.head == tail and not self.live):
            if self.head + n <= self.size:
                return self.head
            return 0 if n <= tail else None
        return self.head if self.head + n <= tail else None

    def alloc(self, numel: int, stop: threading.Event):
        n = -(-numel * 4 // _ALIGN) * _ALIGN
        with self.cond:
            while True:
                pos = self._place(n)
                if pos is not None:
                    break
                if stop.is_set():
                    return None
                self.cond.wait(0.1)
            self.live.append((pos, pos + n))
            self.head = pos + n
        return pos, self.buf[pos // 4:pos // 4 + numel]

    def free(self, pos: int):
        with self.cond:
            self.live = [x for x in self.live if x[0] != pos]
            if not self.live:
                self.head = 0
            self.cond.notify_all()


def read_ahead(produce: Callable[[], Any], stop: threading.Event, depth: int = 1):
    """Iterate `produce()` (a generator function) in a thread, up to `depth` items ahead of the caller.

    An exception in the thread is raised in the caller's. Leaving the loop early sets `stop`, which `produce`
    checks wherever it may wait, and joins the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)

    def put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for item in produce():
                put(item)
            put(None)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(exc)

    thread = threading.Thread(target=run, name="loratool-extract-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _Reader:
    """Reads pairs (in a thread ahead of the consumer when `ahead`) and turns each changed one into its
    float32 delta.

    Yields (entry, delta, changed, energy): `delta` is ft - base, flat float32, a view into the arena, for
    every changed whole entry (hand it back with `release(delta)` once used), energy its exact sum of squares
    (formed piece by piece while the piece is in cache); None for unchanged entries and compare-only ones.
    Pairs are read in pieces into small reused buffers, so memory stays at the arena.
    """

    def __init__(self, ft, base, entries: list[Entry], pin: bool = False, ahead: bool = False):
        self.ft, self.base, self.entries = ft, base, entries
        self.ahead = ahead if READ_AHEAD is None else READ_AHEAD
        biggest = max((e.numel * 4 for e in entries if e.whole), default=0)
        self.arena = _Arena(max(biggest, _ARENA_MIN_BYTES) if biggest else _ALIGN, pin)
        widest = 8
        self.fbuf = torch.empty(_CHUNK_ELEMENTS * widest, dtype=torch.uint8)
        self.bbuf = torch.empty(_CHUNK_ELEMENTS * widest, dtype=torch.uint8)
        self.tmp = torch.empty(_CHUNK_ELEMENTS, dtype=torch.float32)
        self.stop = threading.Event()
        self.pos: dict[int, int] = {}  # data_ptr of a handed-out delta -> its arena position

    def _pieces(self, e: Entry):
        """Pieces of at most _CHUNK_ELEMENTS elements."""
        fd, bd = torch_dtype(e.ft_dtype), torch_dtype(e.base_dtype)
        for start in range(0, e.numel, _CHUNK_ELEMENTS):
            n = min(_CHUNK_ELEMENTS, e.numel - start)
            f = self.fbuf[:n * fd.itemsize].view(fd)
            b = self.bbuf[:n * bd.itemsize].view(bd)
            self.ft.read_into(e.key, f, start)
            self.base.read_into(e.key, b, start)
            yield start, n, f, b

    def _produce(self):
        for e in self.entries:
            if self.stop.is_set():
                return
            if not e.whole:
                changed = any(not _same_bits(f, b) for _, _, f, b in self._pieces(e))
                yield (e, None, changed, None)
                continue
            got = self.arena.alloc(e.numel, self.stop)
            if got is None:
                return
            pos, delta = got
            changed, energy = False, 0.0
            for start, n, f, b in self._pieces(e):
                changed = changed or not _same_bits(f, b)
                d = delta[start:start + n]
                d.copy_(f)
                if b.dtype == torch.float32:
                    d.sub_(b)
                else:
                    t = self.tmp[:n]
                    t.copy_(b)
                    d.sub_(t)
                energy += sum_squares(d)
            if not changed:
                self.arena.free(pos)
                yield (e, None, False, None)
                continue
            with self.arena.cond:
                self.pos[delta.data_ptr()] = pos
            yield (e, delta, True, energy)

    def release(self, delta):
        if delta is not None:
            with self.arena.cond:
                pos = self.pos.pop(delta.data_ptr())
            self.arena.free(pos)

    def __iter__(self):
        if not self.ahead:
            return self._produce()
        return read_ahead(self._produce, self.stop, depth=64)


def sum_squares(x: torch.Tensor) -> float:
    """sum(x^2) of a float32 tensor, accurate to ~1e-9: float32 norms over rows of <= 1024, summed in float64."""
    flat = x.reshape(-1)
    n = flat.numel()
    main = n - n % 1024
    total = 0.0
    if main:
        total += float(torch.linalg.vector_norm(flat[:main].view(-1, 1024), dim=1).double().square().sum())
    if n > main:
        total += float(torch.linalg.vector_norm(flat[main:].double()) ** 2)
    return total


def factorize_batch(Ms: torch.Tensor, entries: list[Entry], energies: list[float],
                    opts: ExtractOptions) -> list[_Factors]:
    """Top singular triplets of each matrix of a batch Ms (b, m, n) float32, enough for the rank rule."""
    b, m, n = Ms.shape
    k = _fixed_rank(opts)
    seeds = [seed_for(opts.seed, e.key) for e in entries]
    if k is not None:
        k = min(k, m, n)
        l = sketch_size(k, m, n, opts.oversample)
        if prefers_exact(l, m, n):
            U, S, Vh = exact_svd(Ms)
            method = "exact"
        else:
            U, S, Vh = randomized_svd(Ms, l, seeds, _p(opts))
            method = "randomized"
        return [_Factors(e, U[i], S[i], Vh[i], energies[i], method) for i, e in enumerate(entries)]
    out = []
    for i, e in enumerate(entries):  # adaptive ranks differ per matrix: one at a time
        M, kk = Ms[i], min(ENERGY_START_RANK, m, n)
        while True:
            l = sketch_size(kk, m, n, opts.oversample)
            if prefers_exact(l, m, n):
                U, S, Vh = exact_svd(M)
                out.append(_Factors(e, U, S, Vh, energies[i], "exact"))
                break
            U, S, Vh = randomized_svd(M, l, seeds[i], _p(opts))
            if _select(S, energies[i], opts, complete=False) is not None:
                out.append(_Factors(e, U, S, Vh, energies[i], "randomized"))
                break
            kk *= 4
    return out


def _clamp(B: torch.Tensor, A: torch.Tensor, q: float):
    """kohya's clamp: hi = quantile of all factor values at q; both factors clamped to [-hi, hi]."""
    hi = quantile(torch.cat([B.reshape(-1), A.reshape(-1)]), q)
    return B.clamp(-hi, hi), A.clamp(-hi, hi)


def finish(f: _Factors, k: int, opts: ExtractOptions, M: torch.Tensor | None = None):
    """Truncate to rank k, clamp and cast; measure the error. Returns (B, A, report) on the CPU.

    M is the float32 matrix view; it is needed only when the residual must be computed directly
    (`needs_residual`).
    """
    e = f.entry
    m, n = e.matrix_shape
    B = f.U[:, :k] * f.S[:k]  # (m, k) * (k,) -> (m, k): B = U diag(S)
    A = f.Vh[:k].clone()  # (k, n); a copy, so the sketch's (l, n) storage is not kept alive
    if opts.clamp_quantile is not None and k > 0:
        B, A = _clamp(B, A, opts.clamp_quantile)
    dt = torch_dtype(OUT_DTYPES[opts.dtype])
    B, A = B.to(dt), A.to(dt)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise overflow_error(e, opts)
    residual = None if M is None else (lambda: residual_squares(M, B.float(), A.float()))
    return B.cpu(), A.cpu(), factor_report(f, k, opts, residual)


def residual_squares(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """||M - B A||_F^2, by row blocks of about 4M elements (never a second m x n buffer)."""
    return residual_squares_by_rows(M, B, A, sum_squares, _CHUNK_ELEMENTS)


def _view(e: Entry, flat: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix view of a flat delta in the base tensor's layout (adapter.py docstring)."""
    return from_base_layout(e, flat.view(e.shape))  # an Entry has the layout and matrix_shape it reads


# ---- the operation -------------------------------------------------------------------------------------------

def run(ft, base, entries: list[Entry], opts: ExtractOptions, names, tick):
    """The torch route of ops.extract.extract (CUDA, or `batch_bytes` on the CPU): same-shaped matrices are
    stacked into batches of up to `batch_bytes` (default 1 GiB) on the device. Returns (done, full targets,
    not extracted, unchanged, dropped)."""
    device = resolve_device(opts.device)
    full_targets: list[Target] = []
    pending: list[_Factors] = []  # budget mode: factors waiting for the global rank choice
    done: dict[str, tuple] = {}  # key -> (B, A, report)
    not_extracted: list[dict] = []
    unchanged = 0
    budget = opts.max_params is not None

    batch_bytes = opts.batch_bytes if opts.batch_bytes is not None else (1 << 30)
    groups: dict[tuple, list] = {}

    def emit(fs: list[_Factors], Ms):
        for i, f in enumerate(fs):
            if budget:  # keep the cap's triplets on the CPU; the global budget picks the ranks at the end
                kcap = min(_fixed_rank(opts), *f.entry.matrix_shape)
                f.U, f.S, f.Vh = (x.cpu().clone() for x in (f.U[:, :kcap], f.S[:kcap], f.Vh[:kcap]))
                pending.append(f)
                continue
            if opts.rank is not None:
                k = min(opts.rank, *f.entry.matrix_shape)
            else:
                k = _select(f.S, f.energy, opts, complete=True)
            done[f.entry.key] = finish(f, k, opts, Ms[i])

    def flush(shape_key):
        items = groups.pop(shape_key)
        Ms = torch.stack([x[1] for x in items])  # (b, m, n) on the device
        emit(factorize_batch(Ms, [x[0] for x in items], [x[2] for x in items], opts), Ms)

    reader = _Reader(ft, base, entries, pin=device.type == "cuda", ahead=device.type == "cuda")
    copier = _Copier(device)

    for e, Mf, changed, E in reader:
        tick(advance=1)
        fate = triage(e, changed, not_extracted)
        if fate == "unchanged":
            unchanged += 1
        if fate is not None:
            continue
        host = Mf  # the device keeps its own copy; the arena's space goes back to the reader at once
        Mf = copier.to_device(host)
        reader.release(host)
        _check_finite(e, E, names)
        if E == 0.0 or e.role == "full":
            delta = None
            if E > 0.0:
                delta = Mf.view(e.shape).to("cpu", torch_dtype(OUT_DTYPES[opts.dtype]), copy=True)
                full_targets.append(full_target(e, delta, E, _cast_error(Mf, delta, E)))
            else:  # bitwise different, numerically equal (-0.0 and 0.0, or a dtype change)
                unchanged += 1
            continue
        skey = (e.matrix_shape,)
        groups.setdefault(skey, []).append((e, _view(e, Mf), E))
        if sum(x[0].numel for x in groups[skey]) * 4 >= batch_bytes:
            flush(skey)
    for skey in list(groups):
        flush(skey)

    dropped: list[str] = []
    if budget:
        redo, dropped = budget_finish(pending, opts, done, not_extracted, finish)
        if redo:
            _second_pass(ft, base, redo, opts, done, device)
    return done, full_targets, not_extracted, unchanged, dropped


class _Copier:
    """A device copy of a delta from the reader's arena. On CUDA the host-to-device copy runs on its own
    stream from the pinned arena, while the reader thread preads the next pairs and earlier batches compute."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return host.clone()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            d = host.to(self.device, non_blocking=True)
        self.stream.synchronize()  # the arena's space goes back to the reader once its bytes are on the device
        d.record_stream(compute)  # the allocator must not hand this block to the copy stream too early
        return d


def _cast_error(Mf: torch.Tensor, delta: torch.Tensor, E: float) -> float:
    if E == 0:
        return 0.0
    return math.sqrt(sum_squares(delta.to(Mf.device, torch.float32).reshape(-1) - Mf) / E)


def _second_pass(ft, base, redo, opts, done, device):
    """Re-read the pairs whose error must be measured on the final (clamped or cast) factors."""
    by_key = {f.entry.key: (f, k) for f, k in redo}
    entries = [f.entry for f, _ in redo]
    reader = _Reader(ft, base, entries)
    for e, Mf, _, _ in reader:
        f, k = by_key[e.key]
        done[e.key] = finish(f, k, opts, _view(e, Mf).to(device))
        reader.release(Mf)


__all__ = ["run", "sum_squares", "factorize_batch", "finish", "residual_squares", "READ_AHEAD"]
