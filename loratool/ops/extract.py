"""Extract a LoRA adapter from a finetuned model and its base: ΔW = W_ft - W_base, truncated SVD per target.

Streaming: the two models are read one tensor pair at a time into buffers that are reused (on the CPU one
thread per core reads a pair and factorises it; with CUDA a reader thread fills the next pair while the
current one is factorised), so neither model is ever whole in memory.

Two routes compute the same thing: on the CPU, numpy (ops/extract_host.py: numpy's BLAS, which is 1.5-2x
faster than torch's for these thin products here, and no `import torch`, which costs 2-4 s); on CUDA, or
with `batch_bytes` (the batched code path), torch (ops/extract_torch.py). Both draw the same Gaussian
sketches (ops/svd_host.py), so they agree to float32 rounding. This module holds what they share: options,
the plan, rank rules, the global budget and the result.

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
  SVD         randomized (ops/svd_host.py; ops/svd.py on CUDA) when the sketch is under half the small side,
              exact otherwise.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .. import spec
from ..adapter import Adapter, Target, matrix_shape, whole_target
from ..container import dtype_name, escape
from ..errors import MismatchError, NumericError
from .svd_host import DEFAULT_POWER_ITERATIONS

FLOAT_DTYPES = spec.FLOAT_DTYPES
OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # --dtype -> safetensors dtype name
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
    """A plain mapping of name -> torch tensor seen through the base-reader interface (keys, info, read_into)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def info(self, key):
        t = self._t.get(key)
        return None if t is None else (tuple(t.shape), dtype_name(t.dtype))

    def read_into(self, key, out, start=0):
        out.copy_(self._t[key].reshape(-1)[start:start + out.numel()])
        return out

    def read_bytes_into(self, key, buf, start=0):
        """Little-endian bytes of elements [start, ...) into `buf` (a writable byte buffer)."""
        from ..container import tensor_bytes

        t = self._t[key]
        raw = tensor_bytes(t).cast("B")
        size = t.element_size()
        buf[:] = raw[start * size:start * size + len(buf)]


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


@dataclass
class _Factors:
    """Top singular triplets of one matrix view, before the rank is final."""

    entry: Entry
    U: Any  # (m, l) float32: a numpy array, or a torch tensor on the torch route
    S: Any  # (l,) float32, descending
    Vh: Any  # (l, n) float32
    energy: float  # ||M||_F^2
    method: str  # "randomized" or "exact"
    info: dict = field(default_factory=dict)


def _np64(S) -> np.ndarray:
    """Singular values as a float64 numpy array, from numpy or from a torch tensor on any device."""
    if hasattr(S, "detach"):
        S = S.detach().cpu().numpy()
    return np.asarray(S, dtype=np.float64)


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
    return opts.power_iterations if opts.power_iterations is not None else DEFAULT_POWER_ITERATIONS


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


def residual_squares_by_rows(M, B, A, sum_squares: Callable[[Any], float], chunk: int) -> float:
    """||M - B A||_F^2 by row blocks of about `chunk` elements (never a second m x n buffer); M, B, A numpy
    arrays or torch tensors alike, `sum_squares` the route's."""
    m, n = M.shape
    rows = max(1, chunk // max(n, 1))
    total = 0.0
    for r0 in range(0, m, rows):
        R = B[r0:r0 + rows] @ A  # (rows, k) @ (k, n) -> (rows, n)
        R -= M[r0:r0 + rows]
        total += sum_squares(R)
    return total


def full_target(e: Entry, delta, E: float, rel_error: float):
    """A changed tensor stored whole (--keep-full, or a vector): its delta, cast to the output dtype, and its
    report (norm, and the relative error of the cast)."""
    return Target(key=e.key, kind="full", layout="full", shape=e.shape, delta=delta, delta_scale=1.0,
                  dtype=e.base_dtype, info={"norm": math.sqrt(E), "rel_error": rel_error})


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


def overflow_error(e: Entry, opts: ExtractOptions) -> NumericError:
    return NumericError(f"target \"{escape(e.key)}\": factors overflow {opts.dtype}; use --dtype bfloat16 or "
                        "float32")


def _check_finite(e: Entry, E: float, names):
    if not math.isfinite(E):
        raise NumericError(f"{names[0]}: tensor \"{escape(e.key)}\": the difference with {names[1]} is not finite "
                           "(NaN or Inf in a model); nothing was written")


# ---- the operation -------------------------------------------------------------------------------------------

def extract(ft, base, opts: ExtractOptions, names=("finetuned", "base"),
            progress: Callable[..., Any] | None = None) -> ExtractResult:
    """Extract an adapter from two models given as base readers (io.base.open_base) or mappings of tensors.

    Args:
        ft, base: the finetuned and the base model; any object with keys(), info(key), read_into(key, out,
            start) and read_bytes_into(key, buf, start) (io.base readers), or a plain mapping of name -> tensor.
        opts: the rank rule and the rest (ExtractOptions).
        names: how messages name the two models (their paths).
        progress: called once with advance=0, total=<tensor pairs>, then with advance=1 after every pair.
    Returns:
        ExtractResult with the adapter (targets keyed by the base tensors' keys, per-target reports in
        Target.info, the run's report in adapter.info["extract"]). On the CPU route the factors are
        hostarray.HostTensors (numpy); hostarray.as_torch turns one into a torch tensor.
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
    entries = plan(ft, base, opts, names)
    tick = progress or (lambda **kw: None)
    tick(advance=0, total=len(entries))
    if opts.device == "cpu" and opts.batch_bytes is None:
        from . import extract_host as route
    else:
        from . import extract_torch as route
    done, full_targets, not_extracted, unchanged, dropped = route.run(ft, base, entries, opts, names, tick)
    return _result(entries, done, full_targets, not_extracted, unchanged, opts, names, dropped)


def triage(e: Entry, changed: bool, not_extracted: list[dict]) -> str | None:
    """What becomes of a pair the reader hands over: "unchanged" (bitwise equal), "listed" (changed but only
    reported: appended to `not_extracted`), or None (its delta is stored)."""
    if not changed:
        return "unchanged"
    if e.role in ("embedding", "vector", "nonfloat"):
        not_extracted.append({"key": e.key, "shape": list(e.shape), "reason": not_extracted_reason(e)})
        return "listed"
    return None


def not_extracted_reason(e: Entry) -> str:
    """Why a changed tensor of this role is listed instead of stored."""
    return {"embedding": "embedding (pass --embeddings to factorise it, or --keep-full to store it)",
            "vector": "not a matrix (pass --keep-full to store it whole)",
            "nonfloat": f"not floating point ({e.ft_dtype}); cannot be stored as a delta"}[e.role]


def budget_finish(pending: list[_Factors], opts: ExtractOptions, done: dict, not_extracted: list[dict],
                  finish: Callable) -> tuple[list, list[str]]:
    """Apply the global --max-params budget to the pending factors: finish those whose error is derived,
    list those left at rank 0. Returns (the (factors, rank) pairs whose error needs a second read, dropped keys)."""
    ranks = _budget_ranks(pending, opts.max_params)
    redo, dropped = [], []
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
    return redo, dropped



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


def _contiguous(x):
    """x in C order, keeping its type (torch tensor, numpy array or HostTensor)."""
    if hasattr(x, "contiguous"):
        return x.contiguous()
    return x if x.flags.c_contiguous else x.copy()


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
        targets.append(whole_target(key, e.layout, e.shape, _contiguous(A), _contiguous(B), alpha=rep["rank"],
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


__all__ = ["ExtractOptions", "ExtractResult", "Entry", "plan", "extract", "model_hints",
           "needs_residual", "kept_energy", "factor_report", "overflow_error", "not_extracted_reason", "triage",
           "budget_finish", "full_target", "residual_squares_by_rows", "OUT_DTYPES", "EMBEDDING_MODULES", "GPT2_CONV1D"]
