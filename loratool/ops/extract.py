"""Extract a LoRA adapter from a finetuned model and its base: ΔW = W_ft - W_base, truncated SVD per target.

Streaming: the two models are read one tensor pair at a time into buffers this module reuses (with CUDA a
reader thread fills the next pair while the current one is factorised), so neither model is ever whole in
memory.

Per tensor, by its shape, name and the options (`plan`):
  2-D weight            a matrix target, layout "linear" (or "fan_in_fan_out" when a hint says GPT-2 Conv1D)
  3-D or more           a conv kernel, layout "conv", flattened to (out, in*kh*kw)
  embedding (by name)   layout "embedding" (M = W^T) only with `embeddings=True`; listed otherwise
  0-D or 1-D            biases, norms, scalars: stored whole as a "full" target with `keep_full=True`,
                        listed otherwise
  not floating point    listed when changed (integer buffers cannot be factorised)
Unchanged tensors (bitwise equal) are skipped and counted. Nothing changed is ever dropped silently: every
tensor that changed and is not in the adapter is in the result's `not_extracted` list.

Numerics, per matrix view M (out, in), all in float32 (spec section 5 of STYLE.md):
  ||M||_F^2   exact: row norms in float32, summed in float64 (a flat float32 norm loses 1e-3 on 16M values).
  SVD         randomized (ops/svd.py) when the sketch is under half the small side, exact otherwise.
  factors     B = U_k diag(S_k) (out, k), A = Vh_k (k, in), alpha = k, scale rule "standard": scale 1
              (the placement of kohya's and PEFT's extractors; A has orthonormal rows).
  error       rel_error = ||M - B A||_F / ||M||_F. For float32 factors without clamping this is
              sqrt(||M||^2 - sum S_k^2) / ||M|| (exact: U_k is orthonormal, so B A is the projection U_k U_k^T M);
              the residual is computed directly instead when clamping or a cast changes the factors, or when
              the relative error is under 3% (where the subtraction would cancel).
  energy      energy retained = 1 - rel_error^2 (equals sum S_k^2 / ||M||^2 for a plain truncation).

Rank selection (exactly one):
  rank R        k = min(R, out, in) on every target.
  energy F      the smallest k whose factors retain at least F of ||M||_F^2 (sketches grow until they do).
  threshold T   every singular value >= T (absolute), as estimated by the sketch.
  max_params N  global budget: every target is factorised up to a cap (rank, default 64); then singular
                triplets are taken greedily by energy per parameter, sigma^2 / (out + in), across all targets
                while the total parameter count stays <= N. Targets left with rank 0 are listed.
"""

from __future__ import annotations

import fnmatch
import json
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import spec
from ..adapter import Adapter, Target, matrix_shape, whole_target
from ..container import dtype_name, escape, torch_dtype
from ..errors import MismatchError, NumericError
from .linalg import from_base_layout
from .svd import (DEFAULT_POWER_ITERATIONS, exact_svd, gaussian_sketch, prefers_exact, quantile, randomized_svd,
                  resolve_device, seed_for, sketch_size)

FLOAT_DTYPES = spec.FLOAT_DTYPES
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_BUDGET_CAP = 64
ENERGY_START_RANK = 32  # first sketch rank for --energy / --threshold; grows x4 until the criterion is met
DIRECT_RESIDUAL_BELOW = 3e-2  # relative error under which the residual is computed, not derived

# Module names (the part before ".weight") of token and position embeddings in transformers models.
EMBEDDING_MODULES = ("embed_tokens", "embed_in", "embed_positions", "wte", "wpe", "word_embeddings",
                     "position_embeddings", "token_type_embeddings", "embeddings", "shared")
# GPT-2 family Conv1D weights, stored (in, out): used when config.json says model_type "gpt2".
GPT2_CONV1D = ("*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight", "*.q_attn.weight")
CONV1D_MODEL_TYPES = ("gpt2",)


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract and how. Exactly one of rank, energy, threshold, max_params selects the rank
    (max_params may be combined with rank, which then caps each target)."""

    rank: int | None = None
    energy: float | None = None
    threshold: float | None = None
    max_params: int | None = None
    targets: tuple[str, ...] = ()  # fnmatch globs on tensor keys; empty means every tensor
    fan_in_fan_out: tuple[str, ...] = ()  # globs of 2-D weights stored (in, out) (GPT-2 Conv1D)
    embeddings: bool = False  # factorise embeddings (layout "embedding") instead of listing them
    keep_full: bool = False  # store changed tensors that are not factorised whole, as "full" targets
    clamp_quantile: float | None = None  # kohya's clamp: both factors to +-quantile(|factor values|, q)
    dtype: str = "float32"  # factor dtype, cast once at the end
    seed: int = 0
    oversample: int | None = None  # sketch columns beyond k; default k (at least 8)
    power_iterations: int | None = None  # default: DEFAULT_POWER_ITERATIONS
    device: str = "cpu"
    batch_bytes: int | None = None  # batch same-shaped matrices up to this many float32 bytes (CUDA default 1 GiB)


@dataclass(frozen=True)
class Entry:
    """One tensor pair to look at, classified by `plan`."""

    key: str
    shape: tuple[int, ...]
    ft_dtype: str
    base_dtype: str
    role: str  # "matrix" | "full" (stored whole) | "embedding" | "vector" | "nonfloat" (listed when changed)
    layout: str | None = None  # for "matrix": linear, fan_in_fan_out, embedding or conv

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.layout, self.shape)

    @property
    def whole(self) -> bool:
        """True when the pair is read whole into a buffer (otherwise it is only compared, in pieces)."""
        return self.role == "matrix" or self.role == "full"


@dataclass
class ExtractResult:
    adapter: Adapter
    rows: list[dict]  # one per stored target: key, layout, shape, rank, rel_error, energy, norm, method
    not_extracted: list[dict]  # changed tensors not in the adapter: key, shape, reason
    unchanged: int
    summary: dict


# ---- inputs ------------------------------------------------------------------------------------------------

class _MappingSource:
    """A plain mapping of name -> tensor seen through the base-reader interface (keys, info, read_into)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def info(self, key):
        t = self._t.get(key)
        return None if t is None else (tuple(t.shape), dtype_name(t.dtype))

    def read_into(self, key, out, start=0):
        out.copy_(self._t[key].reshape(-1)[start:start + out.numel()])
        return out


def _source(obj):
    if isinstance(obj, Mapping):
        return _MappingSource(obj)
    if not hasattr(obj, "read_into"):
        raise TypeError(f"{type(obj).__name__} is neither a mapping of tensors nor a base reader")
    return obj


def model_hints(*paths) -> tuple[str, ...]:
    """fan_in_fan_out globs implied by a Hugging Face folder's config.json (model_type "gpt2": Conv1D).

    A plain 2-D weight cannot say whether it is stored (out, in) or (in, out); only the model type can.
    """
    for p in paths:
        cfg = Path(p) / "config.json" if Path(p).is_dir() else Path(p).parent / "config.json"
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            continue
        if model_type in CONV1D_MODEL_TYPES:
            return GPT2_CONV1D
    return ()


def _is_embedding(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in EMBEDDING_MODULES


def _match(key: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(key, g) for g in globs)


def plan(ft, base, opts: ExtractOptions, names=("finetuned", "base")) -> list[Entry]:
    """Classify every tensor pair from the headers alone; refuse models that do not pair up.

    Raises:
        MismatchError: a tensor is in one model only, shapes differ, or a --targets glob matches nothing.
    """
    ft, base = _source(ft), _source(base)
    fset, bset = set(ft.keys()), set(base.keys())
    keys = sorted(fset | bset)
    if opts.targets:
        for g in opts.targets:
            if not any(fnmatch.fnmatchcase(k, g) for k in keys):
                raise MismatchError(f"{names[0]}: no tensor matches --targets \"{escape(g)}\"; "
                                    "run `loratool extract --help` for the glob syntax")
        keys = [k for k in keys if _match(k, opts.targets)]
    fif = tuple(opts.fan_in_fan_out)
    entries = []
    for k in keys:
        if k not in bset:
            raise MismatchError(f"{names[1]}: tensor \"{escape(k)}\" of {names[0]} is missing; both models need "
                                "the same tensors (restrict with --targets)")
        if k not in fset:
            raise MismatchError(f"{names[0]}: tensor \"{escape(k)}\" of {names[1]} is missing; both models need "
                                "the same tensors (restrict with --targets)")
        (fs, fd), (bs, bd) = ft.info(k), base.info(k)
        fs, bs = tuple(int(x) for x in fs), tuple(int(x) for x in bs)
        if fs != bs:
            raise MismatchError(f"{names[0]}: tensor \"{escape(k)}\" has shape {list(fs)} but {list(bs)} in "
                                f"{names[1]}; the models have different architectures")
        if math.prod(fs) == 0:
            continue
        if fd not in FLOAT_DTYPES or bd not in FLOAT_DTYPES:
            entries.append(Entry(k, fs, fd, bd, "nonfloat"))
        elif len(fs) >= 3:
            entries.append(Entry(k, fs, fd, bd, "matrix", "conv"))
        elif len(fs) == 2:
            if _is_embedding(k):
                entries.append(Entry(k, fs, fd, bd, "matrix", "embedding") if opts.embeddings
                               else Entry(k, fs, fd, bd, "full" if opts.keep_full else "embedding"))
            else:
                entries.append(Entry(k, fs, fd, bd, "matrix", "fan_in_fan_out" if _match(k, fif) else "linear"))
        else:
            entries.append(Entry(k, fs, fd, bd, "full" if opts.keep_full else "vector"))
    return entries


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


class _Reader:
    """Reads pairs (in a thread ahead of the consumer when `ahead`) and turns each changed one into its
    float32 delta.

    Yields (entry, delta, changed, energy, Y): `delta` is ft - base, flat float32, a view into the arena, for
    every changed whole entry (hand it back with `release(delta)` once used), energy its exact sum of squares
    and Y its first sketch M @ Omega when `sketch` asks for one (both formed piece by piece while the piece is
    in cache); None for unchanged entries and compare-only ones. Pairs are read in pieces into small reused buffers, so memory stays at the arena.
    """

    def __init__(self, ft, base, entries: list[Entry], pin: bool = False,
                 sketch: Callable[[Entry], tuple[int, int] | None] | None = None, ahead: bool = False):
        self.ft, self.base, self.entries = ft, base, entries
        self.ahead = ahead if READ_AHEAD is None else READ_AHEAD
        self.sketch = sketch or (lambda e: None)  # entry -> (l, seed) of its first sketch, formed while reading
        biggest = max((e.numel * 4 for e in entries if e.whole), default=0)
        self.arena = _Arena(max(biggest, _ARENA_MIN_BYTES) if biggest else _ALIGN, pin)
        widest = 8
        self.fbuf = torch.empty(_CHUNK_ELEMENTS * widest, dtype=torch.uint8)
        self.bbuf = torch.empty(_CHUNK_ELEMENTS * widest, dtype=torch.uint8)
        self.tmp = torch.empty(_CHUNK_ELEMENTS, dtype=torch.float32)
        self.out: queue.Queue = queue.Queue(maxsize=64)
        self.stop = threading.Event()
        self.pos: dict[int, int] = {}  # data_ptr of a handed-out delta -> its arena position
        self.thread = threading.Thread(target=self._run, name="loratool-extract-reader", daemon=True)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _pieces(self, e: Entry, row: int = 1):
        """Pieces of at most _CHUNK_ELEMENTS elements, each a whole number of `row`-element rows."""
        fd, bd = torch_dtype(e.ft_dtype), torch_dtype(e.base_dtype)
        step = max(1, _CHUNK_ELEMENTS // row) * row
        for start in range(0, e.numel, step):
            n = min(step, e.numel - start)
            f = self.fbuf[:n * fd.itemsize].view(fd)
            b = self.bbuf[:n * bd.itemsize].view(bd)
            self.ft.read_into(e.key, f, start)
            self.base.read_into(e.key, b, start)
            yield start, n, f, b

    def _run(self):
        try:
            for item in self._produce():
                self._put(item)
            self._put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
            self._put(exc)

    def _produce(self):
        for e in self.entries:
            if self.stop.is_set():
                return
            if not e.whole:
                changed = any(not _same_bits(f, b) for _, _, f, b in self._pieces(e))
                yield (e, None, changed, None, None)
                continue
            got = self.arena.alloc(e.numel, self.stop)
            if got is None:
                return
            pos, delta = got
            changed, energy = False, 0.0
            sk = self.sketch(e)
            cols = e.matrix_shape[1] if sk is not None else 1
            if sk is not None:  # rows of M are rows of the flat delta (linear, conv): Y = M @ Omega by pieces
                Omega = gaussian_sketch(cols, sk[0], [sk[1]], "cpu")[0]  # (n, l)
                Y = torch.empty(e.matrix_shape[0], sk[0], dtype=torch.float32)  # (m, l)
            for start, n, f, b in self._pieces(e, cols):
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
                if sk is not None:
                    torch.mm(d.view(-1, cols), Omega, out=Y[start // cols:(start + n) // cols])  # in cache
            if not changed:
                self.arena.free(pos)
                yield (e, None, False, None, None)
                continue
            with self.arena.cond:
                self.pos[delta.data_ptr()] = pos
            yield (e, delta, True, energy, Y if sk is not None else None)

    def release(self, delta):
        if delta is not None:
            with self.arena.cond:
                pos = self.pos.pop(delta.data_ptr())
            self.arena.free(pos)

    def __iter__(self):
        if not self.ahead:
            yield from self._produce()
            return
        self.thread.start()
        try:
            while True:
                item = self.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join()


# ---- numerics ------------------------------------------------------------------------------------------------

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


@dataclass
class _Factors:
    """Top singular triplets of one matrix view, before the rank is final."""

    entry: Entry
    U: torch.Tensor  # (m, l) float32
    S: torch.Tensor  # (l,) float32, descending
    Vh: torch.Tensor  # (l, n) float32
    energy: float  # ||M||_F^2
    method: str  # "randomized" or "exact"
    info: dict = field(default_factory=dict)


def _select(S: torch.Tensor, E: float, opts: ExtractOptions, complete: bool) -> int | None:
    """The rank chosen from the computed singular values, or None when the sketch must grow first."""
    if opts.energy is not None:
        cum = torch.cumsum(S.double() ** 2, 0)
        hit = (cum >= opts.energy * E).nonzero()
        if len(hit):
            return int(hit[0]) + 1
        return S.numel() if complete else None
    if opts.threshold is not None:
        j = int((S >= opts.threshold).sum())
        return j if (j < S.numel() or complete) else None
    raise AssertionError("fixed ranks are chosen before the SVD")


def _fixed_rank(opts: ExtractOptions) -> int | None:
    if opts.max_params is not None:
        return opts.rank or DEFAULT_BUDGET_CAP
    return opts.rank


def _p(opts):
    return opts.power_iterations if opts.power_iterations is not None else DEFAULT_POWER_ITERATIONS


def first_sketch(e: Entry, opts: ExtractOptions) -> tuple[int, int] | None:
    """(l, seed) of the first randomized sketch of a matrix entry; None when it takes an exact SVD."""
    m, n = e.matrix_shape
    k = min(_fixed_rank(opts) or ENERGY_START_RANK, m, n)
    l = sketch_size(k, m, n, opts.oversample)
    return None if prefers_exact(l, m, n) else (l, seed_for(opts.seed, e.key))


def factorize_batch(Ms: torch.Tensor, entries: list[Entry], energies: list[float], opts: ExtractOptions,
                    Y: torch.Tensor | None = None) -> list[_Factors]:
    """Top singular triplets of each matrix of a batch Ms (b, m, n) float32, enough for the rank rule.

    Y, when given, is the first sketch (b, m, l) of `first_sketch` (formed by the reader)."""
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
            U, S, Vh = randomized_svd(Ms, l, seeds, _p(opts), Y=Y)
            method = "randomized"
        return [_Factors(e, U[i], S[i], Vh[i], energies[i], method) for i, e in enumerate(entries)]
    out = []
    for i, e in enumerate(entries):  # adaptive ranks differ per matrix: one at a time
        M, kk = Ms[i], min(ENERGY_START_RANK, m, n)
        Yi = None if Y is None else Y[i]
        while True:
            l = sketch_size(kk, m, n, opts.oversample)
            if prefers_exact(l, m, n):
                U, S, Vh = exact_svd(M)
                out.append(_Factors(e, U, S, Vh, energies[i], "exact"))
                break
            U, S, Vh = randomized_svd(M, l, seeds[i], _p(opts), Y=Yi)
            Yi = None  # a bigger sketch next time, if any
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
    dt = OUT_DTYPES[opts.dtype]
    B, A = B.to(dt), A.to(dt)
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise NumericError(f"target \"{escape(e.key)}\": factors overflow {opts.dtype}; use --dtype bfloat16 or "
                           "float32")
    E = f.energy
    err2 = max(E - float(f.S[:k].double().square().sum()), 0.0)
    if needs_residual(f, k, opts):
        if M is None:
            raise AssertionError("residual needs the matrix")
        err2 = residual_squares(M, B.float(), A.float())
    rel = math.sqrt(err2 / E) if E > 0 else 0.0
    report = {"rank": k, "rel_error": rel, "energy": max(0.0, 1.0 - err2 / E) if E > 0 else 1.0,
              "norm": math.sqrt(E), "method": f.method}
    return B.cpu(), A.cpu(), report


def residual_squares(M: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """||M - B A||_F^2, by row blocks of about 4M elements (never a second m x n buffer)."""
    m, n = M.shape
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    total = 0.0
    for r0 in range(0, m, rows):
        R = B[r0:r0 + rows] @ A  # (rows, k) @ (k, n) -> (rows, n)
        R.sub_(M[r0:r0 + rows])
        total += sum_squares(R)
    return total


def needs_residual(f: _Factors, k: int, opts: ExtractOptions) -> bool:
    if opts.clamp_quantile is not None or opts.dtype != "float32":
        return k > 0
    E = f.energy
    err2 = max(E - float(f.S[:k].double().square().sum()), 0.0)
    return E > 0 and err2 < DIRECT_RESIDUAL_BELOW ** 2 * E


def _view(e: Entry, flat: torch.Tensor) -> torch.Tensor:
    """The (out, in) matrix view of a flat delta in the base tensor's layout (adapter.py docstring)."""
    return from_base_layout(e, flat.view(e.shape))  # an Entry has the layout and matrix_shape it reads


def _check_finite(e: Entry, E: float, names):
    if not math.isfinite(E):
        raise NumericError(f"{names[0]}: tensor \"{escape(e.key)}\": the difference with {names[1]} is not finite "
                           "(NaN or Inf in a model); nothing was written")


# ---- the operation -------------------------------------------------------------------------------------------

def extract(ft, base, opts: ExtractOptions, names=("finetuned", "base"),
            progress: Callable[..., Any] | None = None) -> ExtractResult:
    """Extract an adapter from two models given as base readers (io.base.open_base) or mappings of tensors.

    Args:
        ft, base: the finetuned and the base model; any object with keys(), info(key) and read_into(key, out,
            start), or a plain mapping of name -> tensor.
        opts: the rank rule and the rest (ExtractOptions).
        names: how messages name the two models (their paths).
        progress: called once with advance=0, total=<tensor pairs>, then with advance=1 after every pair.
    Returns:
        ExtractResult with the adapter (targets keyed by the base tensors' keys, per-target reports in
        Target.info, the run's report in adapter.info["extract"]).
    Raises:
        MismatchError: the models do not pair up (missing tensor, shape mismatch).
        NumericError: a difference is not finite, or the factors overflow the output dtype.
    """
    chosen = [x for x in (opts.rank if opts.max_params is None else None, opts.energy, opts.threshold)
              if x is not None]
    if len(chosen) + (opts.max_params is not None) != 1:
        raise ValueError("choose exactly one of rank, energy, threshold or max_params")
    if opts.max_params is not None and (opts.energy is not None or opts.threshold is not None):
        raise ValueError("max_params combines only with rank (a per-target cap)")
    if opts.dtype not in OUT_DTYPES:
        raise ValueError(f"dtype {opts.dtype!r} is not one of {sorted(OUT_DTYPES)}")
    ft, base = _source(ft), _source(base)
    device = resolve_device(opts.device)
    entries = plan(ft, base, opts, names)
    tick = progress or (lambda **kw: None)
    tick(advance=0, total=len(entries))

    full_targets: list[Target] = []
    pending: list[_Factors] = []  # budget mode: factors waiting for the global rank choice
    done: dict[str, tuple] = {}  # key -> (B, A, report)
    not_extracted: list[dict] = []
    unchanged = 0
    budget = opts.max_params is not None

    batching = device.type == "cuda" or opts.batch_bytes is not None
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

    def sketch(e: Entry):
        # The reader forms the first sketch only where rows of M are rows of the flat delta, and only on
        # the single-matrix CPU path (a batch forms its sketches on the device).
        if batching or e.role != "matrix" or e.layout not in ("linear", "conv") or \
                e.matrix_shape[1] > _CHUNK_ELEMENTS:
            return None
        return first_sketch(e, opts)

    reader = _Reader(ft, base, entries, pin=device.type == "cuda", sketch=sketch, ahead=device.type == "cuda")
    copier = _Copier(device) if batching else None

    for e, Mf, changed, E, Y in reader:
        tick(advance=1)
        if not changed:
            unchanged += 1
            continue
        if e.role in ("embedding", "vector", "nonfloat"):
            reason = {"embedding": "embedding (pass --embeddings to factorise it, or --keep-full to store it)",
                      "vector": "not a matrix (pass --keep-full to store it whole)",
                      "nonfloat": f"not floating point ({e.ft_dtype}); cannot be stored as a delta"}[e.role]
            not_extracted.append({"key": e.key, "shape": list(e.shape), "reason": reason})
            continue
        if batching:  # the device keeps its own copy; the arena's space goes back to the reader at once
            host = Mf
            Mf = copier.to_device(host)
            reader.release(host)
        _check_finite(e, E, names)
        if E == 0.0 or e.role == "full":
            delta = None
            if E > 0.0:
                delta = Mf.view(e.shape).to("cpu", OUT_DTYPES[opts.dtype], copy=True)
                full_targets.append(Target(key=e.key, kind="full", layout="full", shape=e.shape, delta=delta,
                                           delta_scale=1.0, dtype=e.base_dtype,
                                           info={"norm": math.sqrt(E), "rel_error": _cast_error(Mf, delta, E)}))
            else:  # bitwise different, numerically equal (-0.0 and 0.0, or a dtype change)
                unchanged += 1
            if not batching:
                reader.release(Mf)
            continue
        if batching:
            skey = (e.matrix_shape,)
            groups.setdefault(skey, []).append((e, _view(e, Mf), E))
            if sum(x[0].numel for x in groups[skey]) * 4 >= batch_bytes:
                flush(skey)
            continue
        M = _view(e, Mf).unsqueeze(0)  # (1, m, n), a view into the reader's arena
        emit(factorize_batch(M, [e], [E], opts, None if Y is None else Y.unsqueeze(0)), M)
        reader.release(Mf)
    for skey in list(groups):
        flush(skey)

    dropped: list[str] = []
    if budget:
        ranks = _budget_ranks(pending, opts.max_params)
        redo = []
        for f in pending:
            k = ranks[f.entry.key]
            if k == 0:
                dropped.append(f.entry.key)
                not_extracted.append({"key": f.entry.key, "shape": list(f.entry.shape),
                                      "reason": f"rank 0 under --max-params {opts.max_params}"})
                continue
            if needs_residual(f, k, opts):
                redo.append((f, k))
            else:
                done[f.entry.key] = finish(f, k, opts)
        if redo:
            _second_pass(ft, base, redo, opts, done, device)

    return _result(entries, done, full_targets, not_extracted, unchanged, opts, names, dropped)


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


def _budget_ranks(pending: list[_Factors], max_params: int) -> dict[str, int]:
    """Greedy on sigma^2 per parameter across all targets, within max_params (see the module docstring)."""
    items = []
    for f in pending:
        m, n = f.entry.matrix_shape
        cost = m + n
        S2 = (f.S.double() ** 2).tolist()
        for i, s2 in enumerate(S2):
            items.append((-s2 / cost, f.entry.key, i, cost))
    items.sort()
    ranks = {f.entry.key: 0 for f in pending}
    used = 0
    for _, key, i, cost in items:
        # Singular values descend within a target and its cost is fixed, so the greedy order takes each
        # target's triplets as a prefix; a triplet is taken only right after the previous one of its target.
        if ranks[key] == i and used + cost <= max_params:
            ranks[key] += 1
            used += cost
    return ranks


def _second_pass(ft, base, redo, opts, done, device):
    """Re-read the pairs whose error must be measured on the final (clamped or cast) factors."""
    by_key = {f.entry.key: (f, k) for f, k in redo}
    entries = [f.entry for f, _ in redo]
    reader = _Reader(ft, base, entries)
    for e, Mf, changed, _, _ in reader:
        f, k = by_key[e.key]
        done[e.key] = finish(f, k, opts, _view(e, Mf).to(device))
        reader.release(Mf)


def _result(entries, done, full_targets, not_extracted, unchanged, opts, names, dropped) -> ExtractResult:
    by_key = {e.key: e for e in entries}
    targets, rows = [], []
    for key in sorted(done):
        B, A, rep = done[key]
        e = by_key[key]
        if rep["rank"] == 0:
            not_extracted.append({"key": key, "shape": list(e.shape),
                                  "reason": f"no singular value >= --threshold {opts.threshold}"})
            continue
        targets.append(whole_target(key, e.layout, e.shape, A.contiguous(), B.contiguous(), alpha=rep["rank"],
                                    dtype=e.base_dtype, info=dict(rep)))
        rows.append({"key": key, "layout": e.layout, "shape": list(e.shape), **rep})
    for t in full_targets:
        rows.append({"key": t.key, "layout": "full", "shape": list(t.shape), "rank": 0,
                     "rel_error": t.info["rel_error"], "energy": 1.0 - t.info["rel_error"] ** 2,
                     "norm": t.info["norm"], "method": "whole"})
    rows.sort(key=lambda r: r["key"])
    norm2 = sum(r["norm"] ** 2 for r in rows)
    err2 = sum((r["rel_error"] * r["norm"]) ** 2 for r in rows)
    selection = ({"max_params": opts.max_params, "cap": _fixed_rank(opts)} if opts.max_params is not None else
                 {"rank": opts.rank} if opts.rank is not None else
                 {"energy": opts.energy} if opts.energy is not None else {"threshold": opts.threshold})
    not_extracted.sort(key=lambda r: r["key"])
    adapter_targets = targets + full_targets
    summary = {
        "finetuned": str(names[0]), "base": str(names[1]), "selection": selection, "seed": opts.seed,
        "oversample": opts.oversample if opts.oversample is not None else "rank (at least 8)",
        "power_iterations": _p(opts), "dtype": opts.dtype, "clamp_quantile": opts.clamp_quantile,
        "factors": "B = U diag(S), A = Vh, alpha = rank (scale 1)",
        "targets": len(targets), "full_targets": len(full_targets), "unchanged": unchanged,
        "rel_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
        "energy": 1.0 - err2 / norm2 if norm2 > 0 else 1.0,
        "not_extracted": not_extracted,
    }
    adapter = Adapter(targets={t.key: t for t in adapter_targets}, info={"extract": summary})
    summary["parameters"] = adapter.n_params
    return ExtractResult(adapter=adapter, rows=rows, not_extracted=not_extracted, unchanged=unchanged,
                         summary=summary)


__all__ = ["ExtractOptions", "ExtractResult", "Entry", "plan", "extract", "model_hints", "sum_squares",
           "factorize_batch", "finish", "EMBEDDING_MODULES", "GPT2_CONV1D"]
