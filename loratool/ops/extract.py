"""Extract a LoRA adapter from a finetuned model and its base: ΔW = W_ft - W_base, truncated SVD per target.

One route for every device. The two models are read one tensor pair at a time, by one thread per core, into
buffers that are reused (ops/extract_run.py), so neither model is ever whole in memory; each pair's matrix
view is factorised by the randomized SVD of ops/svd.py on the chosen device (`loratool.device`: numpy on the
CPU, where torch is never imported; torch on CUDA), and its factors come back as numpy arrays.

Memory: a pair is held as one float32 delta in a reused slot while it is factorised, except a matrix whose
delta is larger than `ExtractOptions.delta_budget` (DELTA_BUDGET_BYTES, 256 MiB): that one is never held; the
same randomized SVD runs on an operator that re-reads the pair in row blocks for each of its products
(`extract_run.StreamedDelta`: one pass for the first sketch, its Y^T M and the norm, one per power iteration
(which also gives the projection), one more when the residual is measured or the sketch is ill-conditioned), so the peak memory is about lanes x budget whatever the
largest matrix. A matrix that needs the exact SVD (a sketch of half its small side or more) and a tensor stored
whole (--keep-full) are still read whole: LAPACK and the stored delta need them in memory.

Per tensor, by its shape, name and the options (`plan`):
  2-D weight            a matrix target, layout "linear" (or "fan_in_fan_out" when a hint says GPT-2 Conv1D)
  fused experts (3-D)   E matrices, one per expert (`expert_layouts`: key -> "experts" (E, out, in) or
                        "experts_t" (E, in, out), told by the caller from the model: io.experts.fused_layouts);
                        each expert is factorised as its own matrix (its own rank under the rank rule; one
                        --max-params budget across all of them) and they are written as one target with one
                        block per expert in that layout, which merge maps back exactly
  3-D or more           a conv kernel, layout "conv", flattened to (out, in*kh*kw)
  embedding (by name)   layout "embedding" (M = W^T) only with `embeddings=True`; listed otherwise
  0-D or 1-D            biases, norms, scalars: stored whole as a "full" target with `keep_full=True`,
                        listed otherwise
  not floating point    listed when changed (integer buffers cannot be factorised)
Unchanged tensors (bitwise equal) are skipped and counted. Nothing changed is ever dropped silently: every
tensor that changed and is not in the adapter is in the result's `not_extracted` list.

Numerics, per matrix view M (out, in), all in float32 (STYLE.md section 5):
  ||M||_F^2   exact: float32 rows summed in float64, while the pair is read (a flat float32 norm loses 1e-3
              on 16M values).
  SVD         randomized (ops/svd.py) when the sketch is under half the small side, exact otherwise. On the
              CPU the first sketch M @ Omega is formed while the pair is read.
  factors     B = U_k diag(S_k) (out, k), A = Vh_k (k, in), alpha = k, scale rule "standard": scale 1
              (the placement of kohya's and PEFT's extractors; A has orthonormal rows); float32, or cast
              once to `dtype` (round to nearest even).
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

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import device as devices
from .. import dtypes, spec
from ..adapter import EXPERT_LAYOUTS, Adapter, Block, Target, expert_span, matrix_shape, whole_target
from ..container import escape, read_json_file
from ..errors import LoraToolError, MismatchError, NumericError
from . import extract_run as lanes
from . import svd

FLOAT_DTYPES = spec.FLOAT_DTYPES
OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # --dtype -> safetensors dtype name
DEFAULT_BUDGET_CAP = 64
ENERGY_START_RANK = 32  # first sketch rank for --energy / --threshold; grows x4 until the criterion is met
DIRECT_RESIDUAL_BELOW = 3e-2  # relative error under which the residual is computed, not derived
# Larger float32 deltas are streamed, not held (an 8B model's lm_head: 2.1 GB); every 1B-class matrix fits.
DELTA_BUDGET_BYTES = 256 << 20
STREAM_BLOCK_BYTES = 16 << 20  # row blocks of a streamed delta: large enough for full-speed GEMMs

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
    clamp_quantile: float | None = None  # kohya's clamp: both factors to +-quantile(factor values, q)
    dtype: str = "float32"  # factor dtype, cast once at the end
    seed: int = 0
    oversample: int | None = None  # sketch columns beyond k; default k (at least 8)
    power_iterations: int | None = None  # default: svd.DEFAULT_POWER_ITERATIONS
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N" (loratool.device.resolve)
    delta_budget: int = DELTA_BUDGET_BYTES  # bytes of float32 delta held per pair; larger matrices stream
    # fused expert tensors: key -> "experts" (E, out, in) or "experts_t" (E, in, out); each expert is its own
    # matrix (io.experts.fused_layouts tells them from the model; empty: every 3-D tensor is a conv kernel)
    expert_layouts: Mapping[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Raises ValueError unless exactly one rank rule is chosen and the dtype is known."""
        chosen = [x for x in (self.rank if self.max_params is None else None, self.energy, self.threshold)
                  if x is not None]
        if len(chosen) + (self.max_params is not None) != 1:
            raise ValueError("choose exactly one of rank, energy, threshold or max_params")
        if self.max_params is not None and (self.energy is not None or self.threshold is not None):
            raise ValueError("max_params combines only with rank (a per-target cap)")
        if int(self.delta_budget) < 1:
            raise ValueError(f"delta_budget {self.delta_budget} must be a positive number of bytes")
        if self.dtype not in OUT_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(OUT_DTYPES)}")


@dataclass(frozen=True)
class Entry:
    """One tensor pair to look at, classified by `plan`."""

    key: str
    shape: tuple[int, ...]
    ft_dtype: str
    base_dtype: str
    role: str  # "matrix" | "full" (stored whole) | "embedding" | "vector" | "nonfloat" (listed when changed)
    layout: str | None = None  # for "matrix": linear, fan_in_fan_out, embedding or conv
    # One expert of a fused expert tensor: `key` names it (EXPERT_KEY), `shape` is its own (d1, d2) slice,
    # layout "linear" ("experts") or "fan_in_fan_out" ("experts_t"); `fused` = (tensor key, expert, fused shape,
    # fused layout). The lanes read it through `_ExpertSlices`, as if it were a tensor of its own.
    fused: tuple | None = None

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
    """What an extraction made: the adapter (numpy factors), its report, and where it was written."""

    adapter: Adapter
    rows: list[dict]  # one per stored target: key, layout, shape, rank, rel_error, energy, norm, method
    not_extracted: list[dict]  # changed tensors not in the adapter: key, shape, reason
    unchanged: int
    summary: dict
    output: Path | None = None  # set by loratool.extract once written
    bytes: int = 0


# ---- inputs ------------------------------------------------------------------------------------------------

class _MappingSource:
    """A plain mapping of name -> array (numpy, or torch: converted once) seen as a base reader (keys, info,
    mapped)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._t = {k: dtypes.as_numpy(v) for k, v in tensors.items()}

    def keys(self):
        return list(self._t)

    def info(self, key):
        a = self._t.get(key)
        return None if a is None else (tuple(a.shape), dtypes.dtype_of(a))

    @contextlib.contextmanager
    def mapped(self, key, start=0, stop=None):
        """Elements [start, stop) of the flattened array (as io.base readers give a window of a tensor)."""
        yield np.ascontiguousarray(self._t[key]).reshape(-1)[start:stop]


def _source(obj):
    if isinstance(obj, Mapping):
        return _MappingSource(obj)
    if not hasattr(obj, "mapped"):
        raise TypeError(f"{type(obj).__name__} is neither a mapping of arrays nor a base reader")
    return obj


def model_hints(*paths) -> tuple[str, ...]:
    """fan_in_fan_out globs implied by a Hugging Face folder's config.json (model_type "gpt2": Conv1D).

    A plain 2-D weight cannot say whether it is stored (out, in) or (in, out); only the model type can.
    """
    for p in paths:
        cfg = Path(p) / "config.json" if Path(p).is_dir() else Path(p).parent / "config.json"
        try:
            model_type = read_json_file(cfg, "config.json").get("model_type")
        except (LoraToolError, AttributeError):  # no readable config: no hint (the weights decide alone)
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
        elif len(fs) == 3 and k in opts.expert_layouts:
            entries.extend(_expert_entries(k, fs, fd, bd, opts.expert_layouts[k]))
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


EXPERT_KEY = "{key}[expert {e}]"  # how an expert of a fused tensor is named in reports and messages


def _expert_entries(key: str, shape, fd: str, bd: str, layout: str) -> list[Entry]:
    """One matrix entry per expert of a fused expert tensor (E, d1, d2): its (d1, d2) slice is a plain matrix,
    (out, in) for "experts", (in, out) (so M = slice^T) for "experts_t"."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {EXPERT_LAYOUTS}")
    E, d1, d2 = shape
    inner = "linear" if layout == "experts" else "fan_in_fan_out"
    return [Entry(EXPERT_KEY.format(key=key, e=e), (d1, d2), fd, bd, "matrix", inner, fused=(key, e, shape, layout))
            for e in range(E)]


class _ExpertSlices:
    """A model reader that also shows each expert of the fused expert tensors the entries split as a tensor of
    its own (EXPERT_KEY): a window of it is the same window of the fused tensor, offset by the expert's start,
    so the lanes read an expert as they read any tensor, without a copy."""

    def __init__(self, reader, entries):
        self._r = reader
        self._parts = {e.key: (e.fused[0], e.fused[1] * e.numel, e.numel) for e in entries if e.fused}

    def keys(self):
        return self._r.keys()

    def info(self, key):
        return self._r.info(key)

    def mapped(self, key, start=0, stop=None):
        if key not in self._parts:
            return self._r.mapped(key, start, stop)
        fused, off, n = self._parts[key]
        return self._r.mapped(fused, off + start, off + (n if stop is None else stop))


def _fused_target(key: str, parts: list):
    """The target of a fused expert tensor from its experts' (entry, (B, A, report)), and its report row: one
    block per expert with rank > 0 at the expert's span (adapter.expert_span), scale 1 (alpha = rank)."""
    _, _, shape, layout = parts[0][0].fused
    blocks, ranks, norm2, err2, methods = [], [0] * shape[0], 0.0, 0.0, set()  # an unchanged expert: rank 0
    for e, (B, A, rep) in parts:
        k = rep["rank"]
        ranks[e.fused[1]] = k
        norm2 += rep["norm"] ** 2
        err2 += (rep["rel_error"] * rep["norm"]) ** 2
        methods.add(rep["method"])
        if k > 0:
            rows, cols = expert_span(layout, shape, e.fused[1])
            blocks.append(Block(rank=k, alpha=float(k), scale_rule="standard", rows=rows, cols=cols, A=A, B=B))
    rel = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
    rep = {"rank": sum(ranks), "rel_error": rel, "energy": max(0.0, 1.0 - err2 / norm2) if norm2 > 0 else 1.0,
           "norm": math.sqrt(norm2), "method": "+".join(sorted(methods)), "expert_ranks": ranks}
    target = Target(key=key, layout=layout, shape=tuple(shape), blocks=tuple(blocks), dtype=parts[0][0].base_dtype,
                    info=dict(rep))
    return target, {"key": key, "layout": layout, "shape": list(shape), **rep}


# ---- rank rules and reports --------------------------------------------------------------------------------

@dataclass
class _Factors:
    """Top singular triplets of one matrix view, before the rank is final."""

    entry: Entry
    U: Any  # (m, l) float32, an array of the device (numpy once kept for the global budget)
    S: Any  # (l,) float32, descending
    Vh: Any  # (l, n) float32
    energy: float  # ||M||_F^2
    method: str  # "randomized" or "exact"
    info: dict = field(default_factory=dict)


def _np64(S) -> np.ndarray:
    """Singular values as a float64 numpy array, from an array of any device."""
    return np.asarray(dtypes.as_numpy(S), dtype=np.float64)


def _select(S, E: float, opts: ExtractOptions, complete: bool) -> int | None:
    """The rank chosen from the computed singular values, or None when the sketch must grow first."""
    s = _np64(S)
    if opts.energy is not None:
        hit = np.nonzero(np.cumsum(s ** 2) >= opts.energy * E)[0]
        if len(hit):
            return int(hit[0]) + 1
        return s.size if complete else None
    if opts.threshold is not None:
        j = int((s >= opts.threshold).sum())
        return j if (j < s.size or complete) else None
    raise AssertionError("fixed ranks are chosen before the SVD")


def _fixed_rank(opts: ExtractOptions) -> int | None:
    if opts.max_params is not None:
        return opts.rank or DEFAULT_BUDGET_CAP
    return opts.rank


def _p(opts):
    return opts.power_iterations if opts.power_iterations is not None else svd.DEFAULT_POWER_ITERATIONS


def kept_energy(f: _Factors, k: int) -> float:
    """sum(S[:k]^2) in float64."""
    return float((_np64(f.S[:k]) ** 2).sum())


def needs_residual(f: _Factors, k: int, opts: ExtractOptions) -> bool:
    """Whether the error of the rank-k factors must be measured on M (clamped or cast factors, or an error
    small enough that E - sum S^2 would cancel) instead of derived from the singular values."""
    if opts.clamp_quantile is not None or opts.dtype != "float32":
        return k > 0
    E = f.energy
    err2 = max(E - kept_energy(f, k), 0.0)
    return E > 0 and err2 < DIRECT_RESIDUAL_BELOW ** 2 * E


def factor_report(f: _Factors, k: int, opts: ExtractOptions, residual: Callable[[], float] | None) -> dict:
    """The report of the rank-k factors: error from the singular values, or `residual()` (||M - B A||_F^2 of the
    stored factors) where `needs_residual` says so (callers without the matrix pass None)."""
    E = f.energy
    if needs_residual(f, k, opts):
        if residual is None:
            raise AssertionError("residual needs the matrix")
        err2 = residual()
    else:
        err2 = max(E - kept_energy(f, k), 0.0)
    rel = math.sqrt(err2 / E) if E > 0 else 0.0
    return {"rank": k, "rel_error": rel, "energy": max(0.0, 1.0 - err2 / E) if E > 0 else 1.0,
            "norm": math.sqrt(E), "method": f.method}


def overflow_error(e: Entry, opts: ExtractOptions, what: str = "factors overflow") -> NumericError:
    return NumericError(f"target \"{escape(e.key)}\": {what} {opts.dtype}; use --dtype bfloat16 or float32")


def _check_finite(e: Entry, E: float, names):
    if not math.isfinite(E):
        raise NumericError(f"{names[0]}: tensor \"{escape(e.key)}\": the difference with {names[1]} is not finite "
                           "(NaN or Inf in a model); nothing was written")


def not_extracted_reason(e: Entry) -> str:
    """Why a changed tensor of this role is listed instead of stored."""
    return {"embedding": "embedding (pass --embeddings to factorise it, or --keep-full to store it)",
            "vector": "not a matrix (pass --keep-full to store it whole)",
            "nonfloat": f"not floating point ({e.ft_dtype}); cannot be stored as a delta"}[e.role]


# ---- factorising one pair ----------------------------------------------------------------------------------

def first_sketch(e: Entry, opts: ExtractOptions) -> int | None:
    """Columns of the first randomized sketch of this matrix, or None when its SVD is exact."""
    m, n = e.matrix_shape
    k = _fixed_rank(opts)
    kk = min(k if k is not None else ENERGY_START_RANK, m, n)
    l = svd.sketch_size(kk, m, n, opts.oversample)
    return None if svd.prefers_exact(l, m, n) else l


def streams(e: Entry, opts: ExtractOptions) -> bool:
    """Whether the pair is factorised through a `StreamedDelta` instead of a slot: a matrix whose float32
    delta exceeds the budget and whose SVD is randomized (the exact SVD needs the matrix in memory)."""
    return e.role == "matrix" and 4 * e.numel > opts.delta_budget and first_sketch(e, opts) is not None


def read_whole(opts: ExtractOptions) -> Callable[[Entry], bool]:
    """The predicate of the entries that get a delta slot (extract_run.run_lanes's `whole`)."""
    return lambda e: e.whole and not streams(e, opts)


def streamed_delta(dev, ft, base, e: Entry, s, opts: ExtractOptions) -> lanes.StreamedDelta:
    """The pair as an operator reading row blocks of at most STREAM_BLOCK_BYTES (and at most the budget)."""
    return lanes.StreamedDelta(dev, ft, base, e, s, max(1, min(STREAM_BLOCK_BYTES, opts.delta_budget) // 4))


def sketch_while_reading(dev, e: Entry, opts: ExtractOptions) -> np.ndarray | None:
    """The test matrix Omega (n, l) of the pair's first sketch when it is formed while the pair is read (on the
    CPU, for a row-major matrix view whose rows fit a piece, and a randomized SVD), else None. It is the one
    `svd.randomized_svd` would draw. On CUDA the device forms the sketch, faster than the CPU while reading."""
    if not (dev.is_cpu and e.role == "matrix" and e.layout in ("linear", "conv")):
        return None
    n = e.matrix_shape[1]
    l = first_sketch(e, opts)
    if l is None or not lanes.sketch_fits(n):
        return None
    return svd.gaussian_sketch(n, l, svd.seed_for(opts.seed, e.key))


def _view(xp, e: Entry, flat):
    """The (out, in) matrix view of a flat delta in the base tensor's layout (adapter.py docstring)."""
    if e.layout in ("fan_in_fan_out", "embedding"):
        return xp.reshape(flat, e.shape).T
    return xp.reshape(flat, e.matrix_shape)


def factorize(dev, M, e: Entry, E: float, opts: ExtractOptions, Y=None, W=None) -> _Factors:
    """Top singular triplets of the matrix view M (m, n) on `dev` (an array, or an operator such as a
    `StreamedDelta`), enough for the rank rule. `Y`, `W`: the first sketch Y = M @ Omega and W = Y^T M when
    already formed while reading. An operator cannot go to LAPACK: where an array's growing sketch would switch to the exact SVD,
    an operator's takes the whole small side (a complete sketch, exact to float32 rounding)."""
    m, n = M.shape
    seed = svd.seed_for(opts.seed, e.key)
    l = first_sketch(e, opts)
    if l is None:
        return _Factors(e, *svd.exact_svd(dev, M), E, "exact")
    if _fixed_rank(opts) is not None:
        return _Factors(e, *svd.randomized_svd(dev, M, l, seed, _p(opts), Y=Y, W=W), E, "randomized")
    kk = min(ENERGY_START_RANK, m, n)
    while True:  # adaptive ranks: grow the sketch x4 until the rule is decided
        U, S, Vh = svd.randomized_svd(dev, M, l, seed, _p(opts), Y=Y, W=W)
        if _select(S, E, opts, complete=l == min(m, n)) is not None:
            return _Factors(e, U, S, Vh, E, "randomized")
        kk *= 4
        l, Y, W = svd.sketch_size(kk, m, n, opts.oversample), None, None
        if svd.prefers_exact(l, m, n):
            if not svd.is_operator(M):
                return _Factors(e, *svd.exact_svd(dev, M), E, "exact")
            l = min(m, n)


def _stored(x: np.ndarray, st: str) -> np.ndarray:
    """float32 host values as stored: C-contiguous, cast once to `st` (round to nearest even)."""
    return np.ascontiguousarray(x) if st == "F32" else dtypes.cast(np.ascontiguousarray(x), st)


def finish(dev, f: _Factors, k: int, opts: ExtractOptions, M=None):
    """Truncate to rank k, clamp and cast; measure the error. Returns (B, A, report), B and A numpy arrays.

    M is the float32 matrix view on `dev` (or its operator); it is needed only when the residual must be
    computed directly (`needs_residual`).

    Raises:
        NumericError: the factors overflow the output dtype.
    """
    B = np.array(dev.to_numpy(f.U[:, :k] * f.S[:k]), order="C")  # (m, k) * (k,) -> (m, k): B = U diag(S)
    A = np.array(dev.to_numpy(f.Vh[:k]), order="C")  # (k, n); a copy, so the sketch's (l, n) storage is freed
    if opts.clamp_quantile is not None and k > 0:
        hi = svd.quantile(np.concatenate([B.reshape(-1), A.reshape(-1)]), opts.clamp_quantile)
        np.clip(B, -hi, hi, out=B)
        np.clip(A, -hi, hi, out=A)
    st = OUT_DTYPES[opts.dtype]
    if dtypes.out_of_range(B, st) is not None or dtypes.out_of_range(A, st) is not None:
        raise overflow_error(f.entry, opts)
    B, A = _stored(B, st), _stored(A, st)
    residual = None if M is None else (lambda: svd.residual_squares(dev, M, dev.asarray(B), dev.asarray(A)))
    return B, A, factor_report(f, k, opts, residual)


def _full_target(e: Entry, delta: np.ndarray, E: float, opts: ExtractOptions) -> Target:
    """A changed tensor stored whole (--keep-full): its delta cast to the output dtype, and its report (norm,
    and the relative error of the cast)."""
    st = OUT_DTYPES[opts.dtype]
    if dtypes.out_of_range(delta, st) is not None:
        raise overflow_error(e, opts, "its difference overflows")
    stored = np.array(delta) if st == "F32" else dtypes.cast(delta, st)  # a copy: the slot is reused
    err2, cpu, step = 0.0, devices.cpu(), lanes.CHUNK_ELEMENTS
    if st != "F32":
        for a in range(0, delta.size, step):  # in pieces: no float32 copy of a whole embedding
            err2 += svd.sum_squares(cpu, stored[a:a + step].astype(np.float32) - delta[a:a + step])
    return Target(key=e.key, kind="full", layout="full", shape=e.shape, delta=stored.reshape(e.shape),
                  delta_scale=1.0, dtype=e.base_dtype, info={"norm": math.sqrt(E), "rel_error": math.sqrt(err2 / E)})


def _pair(dev, ft, base, opts: ExtractOptions, names, budget: bool):
    """The lanes' work on one pair: returns what becomes of it, as (kind, value) with kind one of
    "unchanged", "listed" (value: the not_extracted record), "full" (a Target), "done" ((B, A, report)) and
    "pending" (host factors for the global budget)."""

    def handle(s: lanes.Scratch, e: Entry, delta):
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite deltas are refused by name below
            M = None
            if delta is None and not streams(e, opts):  # compared only
                if not lanes.changed(ft, base, e, s):
                    return "unchanged", None
                return "listed", {"key": e.key, "shape": list(e.shape), "reason": not_extracted_reason(e)}
            if delta is None:  # too large to hold: the first pass forms the first sketch and the norm
                M = streamed_delta(dev, ft, base, e, s, opts)
                omega = svd.gaussian_sketch(M.shape[1], first_sketch(e, opts), svd.seed_for(opts.seed, e.key))
                Y, W = svd.project(M, dev.asarray(omega))  # (m, l) = M @ Omega, (l, n) = Y^T M
                E = M.energy
            else:
                E, Y, W = lanes.subtract(ft, base, e, delta, s, sketch_while_reading(dev, e, opts))
            if not math.isfinite(E) and not lanes.changed(ft, base, e, s):
                return "unchanged", None  # NaN or Inf in the same places of both
            if E == 0.0:  # bitwise equal, or numerically (-0.0 and 0.0, a dtype change)
                return "unchanged", None
            _check_finite(e, E, names)
            if e.role == "full":
                return "full", _full_target(e, delta, E, opts)
            if M is None:
                M = _view(dev.xp, e, dev.asarray(delta))  # on the CPU the slot itself; a copy on CUDA
            f = factorize(dev, M, e, E, opts, Y, W)
            if budget:  # keep the cap's triplets on the host; the global budget picks the ranks at the end
                kcap = min(_fixed_rank(opts), *e.matrix_shape)
                f.U, f.S, f.Vh = (np.array(dev.to_numpy(x)) for x in (f.U[:, :kcap], f.S[:kcap], f.Vh[:kcap]))
                return "pending", f
            k = min(opts.rank, *e.matrix_shape) if opts.rank is not None else _select(f.S, E, opts, complete=True)
            return "done", finish(dev, f, k, opts, M)

    return handle


def _run(dev, ft, base, entries: list[Entry], opts: ExtractOptions, names, tick):
    """Every pair through the lanes; returns (done, full targets, not extracted, unchanged)."""
    full_targets: list[Target] = []
    pending: list[_Factors] = []  # budget mode: factors waiting for the global rank choice
    done: dict[str, tuple] = {}  # key -> (B, A, report)
    not_extracted: list[dict] = []
    unchanged = 0
    budget = opts.max_params is not None
    n_lanes, per_lane = lanes.lane_plan()
    whole = read_whole(opts)
    with devices.blas_threads(per_lane):
        outcomes = lanes.run_lanes(entries, _pair(dev, ft, base, opts, names, budget), n_lanes,
                                   lanes.slot_sizes(entries, n_lanes, whole), tick, whole)
        for e, (kind, value) in zip(entries, outcomes):
            if kind == "unchanged":
                unchanged += e.fused is None  # a fused expert tensor is counted below, once
            elif kind == "listed":
                not_extracted.append(value)
            elif kind == "full":
                full_targets.append(value)
            elif kind == "pending":
                pending.append(value)
            else:
                done[e.key] = value

        moved = {e.fused[0] for e, (kind, _) in zip(entries, outcomes) if e.fused and kind != "unchanged"}
        unchanged += len({e.fused[0] for e in entries if e.fused} - moved)  # none of its experts changed
        if budget:
            redo = _budget_finish(pending, opts, done, not_extracted)
            if redo:  # re-read the pairs whose error must be measured on the final (clamped or cast) factors
                by_key = {f.entry.key: (f, k) for f, k in redo}
                again = [f.entry for f, _ in redo]

                def measure(s: lanes.Scratch, e: Entry, delta):
                    f, k = by_key[e.key]
                    with np.errstate(over="ignore", invalid="ignore"):
                        if delta is None:  # streamed: the residual is measured while re-reading
                            return finish(dev, f, k, opts, streamed_delta(dev, ft, base, e, s, opts))
                        lanes.subtract(ft, base, e, delta, s)
                        return finish(dev, f, k, opts, _view(dev.xp, e, dev.asarray(delta)))

                sizes = lanes.slot_sizes(again, n_lanes, whole)
                for e, value in zip(again, lanes.run_lanes(again, measure, n_lanes, sizes, whole=whole)):
                    done[e.key] = value
    return done, full_targets, not_extracted, unchanged


def _budget_finish(pending: list[_Factors], opts: ExtractOptions, done: dict, not_extracted: list[dict]):
    """Apply the global --max-params budget to the pending (host) factors: finish those whose error is derived,
    list those left at rank 0. Returns the (factors, rank) pairs whose error needs a second read."""
    ranks = _budget_ranks(pending, opts.max_params)
    redo = []
    for f in pending:
        k = ranks[f.entry.key]
        if k == 0:
            not_extracted.append({"key": f.entry.key, "shape": list(f.entry.shape),
                                  "reason": f"rank 0 under --max-params {opts.max_params}"})
            continue
        if needs_residual(f, k, opts):
            redo.append((f, k))
        else:
            done[f.entry.key] = finish(devices.cpu(), f, k, opts)
    return redo


def _budget_ranks(pending: list[_Factors], max_params: int) -> dict[str, int]:
    """Greedy on sigma^2 per parameter across all targets, within max_params (see the module docstring)."""
    items = []
    for f in pending:
        m, n = f.entry.matrix_shape
        cost = m + n
        S2 = (_np64(f.S) ** 2).tolist()
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


# ---- the operation -------------------------------------------------------------------------------------------

def extract(ft, base, opts: ExtractOptions, names=("finetuned", "base"),
            progress: Callable[..., Any] | None = None) -> ExtractResult:
    """Extract an adapter from two models given as base readers (io.base.open_base) or mappings of arrays.

    Args:
        ft, base: the finetuned and the base model; any object with keys(), info(key) -> (shape, dtype name)
            and mapped(key) (io.base readers), or a plain mapping of name -> numpy array
            or torch tensor.
        opts: the rank rule, the device and the rest (ExtractOptions).
        names: how messages name the two models (their paths).
        progress: called once with advance=0, total=<tensor pairs>, then with advance=1 after every pair.
    Returns:
        ExtractResult with the adapter (targets keyed by the base tensors' keys; factors and full deltas are
        numpy arrays, float32 or the cast `opts.dtype`; per-target reports in Target.info, the run's report in
        adapter.info["extract"]).
    Raises:
        ValueError: the options choose no rank rule or more than one (ExtractOptions.check).
        UnsupportedError: the device is not available.
        MismatchError: the models do not pair up (missing tensor, shape mismatch).
        NumericError: a difference is not finite, or the factors overflow the output dtype.
    """
    opts.check()
    ft, base = _source(ft), _source(base)
    with devices.session(opts.device) as dev:
        entries = plan(ft, base, opts, names)
        if any(e.fused for e in entries):  # experts of fused tensors are read as tensors of their own
            ft, base = _ExpertSlices(ft, entries), _ExpertSlices(base, entries)
        tick = progress or (lambda **kw: None)
        tick(advance=0, total=len(entries))
        done, full_targets, not_extracted, unchanged = _run(dev, ft, base, entries, opts, names, tick)
    return _result(entries, done, full_targets, not_extracted, unchanged, opts, names)


def _result(entries, done, full_targets, not_extracted, unchanged, opts, names) -> ExtractResult:
    by_key = {e.key: e for e in entries}
    targets, rows = [], []
    experts: dict[str, list] = {}  # fused tensor key -> its experts' (entry, (B, A, report)), in expert order
    for e in entries:
        if e.fused is not None:
            experts.setdefault(e.fused[0], [])
            if e.key in done:
                experts[e.fused[0]].append((e, done.pop(e.key)))
    for key, parts in experts.items():
        listed = [r for r in not_extracted if r["key"].startswith(key + "[expert ")]
        not_extracted[:] = [r for r in not_extracted if r not in listed]
        if not any(rep["rank"] for _, (_, _, rep) in parts):
            if parts or listed:  # changed, but no expert kept a singular triplet
                why = listed[0]["reason"] if listed else f"no singular value >= --threshold {opts.threshold}"
                not_extracted.append({"key": key, "shape": list(by_key[EXPERT_KEY.format(key=key, e=0)].fused[2]),
                                      "reason": f"every expert: {why}"})
            continue
        target, row = _fused_target(key, parts)
        targets.append(target)
        rows.append(row)
    for key in sorted(done):
        B, A, rep = done[key]
        e = by_key[key]
        if rep["rank"] == 0:
            not_extracted.append({"key": key, "shape": list(e.shape),
                                  "reason": f"no singular value >= --threshold {opts.threshold}"})
            continue
        targets.append(whole_target(key, e.layout, e.shape, A, B, alpha=rep["rank"], dtype=e.base_dtype,
                                    info=dict(rep)))
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
    adapter = Adapter(targets={t.key: t for t in targets + full_targets}, info={"extract": summary})
    summary["parameters"] = adapter.n_params
    return ExtractResult(adapter=adapter, rows=rows, not_extracted=not_extracted, unchanged=unchanged,
                         summary=summary)


__all__ = ["ExtractOptions", "ExtractResult", "Entry", "plan", "extract", "model_hints", "factorize", "finish",
           "first_sketch", "streams", "read_whole", "streamed_delta", "sketch_while_reading", "needs_residual",
           "kept_energy", "factor_report", "overflow_error",
           "not_extracted_reason", "OUT_DTYPES", "EXPERT_KEY", "DELTA_BUDGET_BYTES", "EMBEDDING_MODULES", "GPT2_CONV1D"]
