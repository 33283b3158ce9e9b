"""Combine adapters into one: a registry of named methods, each exact about what it computes.

Notation: adapter i has weight w_i and, on a target, matrix-view delta ΔW_i (zero when it lacks the target).

  concat  ΔW = Σ w_i ΔW_i exactly. Every block of every adapter is appended with alpha_i * w_i, so factors
          are copied bit for bit and each block keeps its own rank and scale rule: no cross terms B_i A_j
          (PEFT `linear`, kohya's factor merge) and no rsLoRA over-scaling (PEFT `cat` with use_rslora).
  svd     the concat sum, truncated to rank R per block group from the factors (ops/factored.py).
  ties    TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models", arXiv:2306.01708)
          on the weighted task vectors τ_i = w_i ΔW_i of each target, dense:
            1. trim: keep the round(density * n_i) entries of τ_i largest in magnitude, zero the rest, where
               n_i counts the entries adapter i can change (the union of its block rectangles);
            2. elect: γ = sign(Σ_i trimmed τ_i) per entry (the paper's total-mass election; 0 counts as +);
            3. disjoint mean: ΔW = mean of the trimmed τ_i whose sign equals γ, over those i only
               (entries no adapter keeps stay 0). The paper's final λ is 1: scale with --weights or rescale.
          Electing on the weighted τ_i follows mergekit; PEFT elects on the unweighted deltas.
  dare    DARE (Yu et al. 2023, "Language Models are Super Mario", arXiv:2311.03099) followed by task
          arithmetic: ΔW = Σ w_i (m_i ⊙ ΔW_i) / density with m_i ~ Bernoulli(density) drawn per entry from a
          generator seeded by (seed, target key), adapters in order; PEFT calls this `dare_linear`.
  ties and dare build each target's dense out x in delta, then truncate it to rank R per block group with a
  dense SVD. Full targets (whole-tensor deltas) go through the same elementwise rules and are not truncated.

Compressed blocks follow ops/factored.py: a group whose blocks share one scale keeps it, otherwise scale 1.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, replace

import torch

from ..adapter import Adapter, Target
from ..container import escape
from ..errors import MismatchError, NumericError
from .factored import factor_dtype, promoted_dtype, truncate_target, truncate_target_dense
from .linalg import delta_matrix, f32


@dataclass
class CombineResult:
    adapter: Adapter
    rows: list[dict] = field(default_factory=list)


def _shape_str(t: Target) -> str:
    return "x".join(str(s) for s in t.shape)


def aligned_targets(adapters, names) -> dict[str, list[tuple[int, Target]]]:
    """key -> [(adapter index, target)] over the union of target sets, after checking they agree.

    Raises:
        MismatchError: a target differs in kind, layout or shape, or in its recorded base fingerprint.
    """
    out: dict[str, list[tuple[int, Target]]] = {}
    for i, a in enumerate(adapters):
        for t in a:
            out.setdefault(t.key, []).append((i, t))
    for key, items in out.items():
        i0, t0 = items[0]
        for i, t in items[1:]:
            if (t.kind, t.layout, tuple(t.shape)) != (t0.kind, t0.layout, tuple(t0.shape)):
                raise MismatchError(f"target \"{escape(key)}\": {names[i]} has {t.kind} layout {t.layout} shape "
                                    f"{_shape_str(t)} but {names[i0]} has {t0.kind} layout {t0.layout} shape "
                                    f"{_shape_str(t0)}; combine only adapters made for the same base")
            for f in ("dtype", "sha256"):
                a_, b_ = getattr(t0, f), getattr(t, f)
                if a_ is not None and b_ is not None and a_ != b_:
                    raise MismatchError(f"target \"{escape(key)}\": {names[i]} records base {f} {b_} but "
                                        f"{names[i0]} records {a_}; the adapters were made for different bases")
    return dict(sorted(out.items()))


def _fingerprint(items) -> dict:
    fp = {}
    for f in ("dtype", "sha256"):
        vals = [getattr(t, f) for _, t in items if getattr(t, f) is not None]
        fp[f] = vals[0] if vals else None
    return fp


def concat_target(key: str, items, weights) -> Target:
    """Σ w_i ΔW_i of one target, exactly: blocks appended with alpha * w (factors untouched)."""
    t0 = items[0][1]
    fp = _fingerprint(items)
    if t0.kind == "full":
        if len(items) == 1:
            i, t = items[0]
            return replace(t, delta_scale=t.delta_scale * weights[i], info={}, **fp)
        # (shape) float32 sum, cast once to the inputs' promoted dtype
        D = sum(f32(t.delta, "cpu") * (t.delta_scale * weights[i]) for i, t in items)
        dtype = promoted_dtype(t.delta for _, t in items)
        return replace(t0, delta=D.to(dtype), delta_scale=1.0, info={}, **fp)
    blocks = [replace(b, alpha=b.alpha * weights[i]) for i, t in items for b in t.blocks]
    return replace(t0, blocks=tuple(blocks), info={}, **fp)


def _views(items, weights) -> list[torch.Tensor]:
    """Dense weighted task vectors τ_i = w_i ΔW_i (matrix view for lora targets, own shape for full ones)."""
    out = []
    for i, t in items:
        if t.kind == "full":
            out.append(f32(t.delta, "cpu") * (t.delta_scale * weights[i]))
        else:
            out.append(delta_matrix(t, "cpu") * weights[i])  # (out, in)
    return out


def _support(t: Target) -> torch.Tensor:
    """Boolean mask of the entries adapter's target can change (union of its block rectangles)."""
    if t.kind == "full":
        return torch.ones(t.shape, dtype=torch.bool)
    m = torch.zeros(t.matrix_shape, dtype=torch.bool)
    for b in t.blocks:
        m[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = True
    return m


def trim(tau: torch.Tensor, n: int, density: float) -> torch.Tensor:
    """TIES step 1: keep the round(density * n) entries of largest magnitude (at least 1), zero the rest.

    round() rounds halves up here (floor(x + 0.5)), not to even as Python's round does.
    """
    k = max(1, min(tau.numel(), math.floor(density * n + 0.5)))
    flat = tau.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(tau.shape)


def ties_merge(taus, ns, density: float) -> torch.Tensor:
    """TIES-Merging of weighted task vectors (trim, elect by total mass, disjoint mean); see the module docstring."""
    trimmed = [trim(t, n, density) for t, n in zip(taus, ns)]
    gamma = torch.where(sum(trimmed) >= 0, 1.0, -1.0)  # elected sign per entry
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for t in trimmed:
        agree = torch.sign(t) == gamma  # zeros never agree: they were trimmed or never there
        total += torch.where(agree, t, 0.0)
        count += agree
    return total / count.clamp(min=1.0)


def _generator(seed: int, key: str) -> torch.Generator:
    # Per-target seed: a target's mask does not depend on which other targets the adapters have.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63))


def dare_merge(taus, density: float, seed: int, key: str) -> torch.Tensor:
    """DARE drop-and-rescale of each weighted task vector, then their sum; see the module docstring."""
    g = _generator(seed, key)
    total = torch.zeros_like(taus[0])
    for t in taus:
        keep = torch.rand(t.shape, generator=g) < density  # Bernoulli(density) per entry
        total += torch.where(keep, t, 0.0) / density
    return total


def _dense_target(key, items, weights, method, rank, density, seed) -> tuple[Target, dict]:
    t0 = items[0][1]
    taus = _views(items, weights)
    if method == "ties":
        M = ties_merge(taus, [int(_support(t).sum()) for _, t in items], density)
    else:
        M = dare_merge(taus, density, seed, key)
    fp = _fingerprint(items)
    if t0.kind == "full":
        dtype = promoted_dtype(t.delta for _, t in items)
        D = M.to(dtype)
        if not bool(torch.isfinite(D).all()):
            raise NumericError(f"target \"{escape(key)}\": the merged delta is not finite in {dtype}")
        row = {"target": key, "kind": "full", "rank_before": None, "rank_after": None, "energy_retained": 1.0,
               "relative_error": 0.0}
        return replace(t0, delta=D, delta_scale=1.0, info={}, **fp), row
    rects = [(b.rows, b.cols) for _, t in items for b in t.blocks]
    dtype = factor_dtype(b for _, t in items for b in t.blocks)
    base = replace(t0, info={}, **fp)
    return truncate_target_dense(base, M, rects, rank, None, dtype, sum(t.rank for _, t in items))


METHODS = {
    "concat": "exactly Σ w_i ΔW_i: blocks appended with alpha scaled by w_i",
    "svd": "the concat sum truncated to --rank per block group, from the factors",
    "ties": "TIES-Merging (Yadav et al. 2023) on w_i ΔW_i, then truncated to --rank",
    "dare": "DARE (Yu et al. 2023) drop-and-rescale, weighted sum, then truncated to --rank",
}


def combine(adapters, weights=None, method: str = "concat", rank: int | None = None,
            density: float | None = None, seed: int = 0, names=None, progress=None) -> CombineResult:
    """Combine adapters target by target over the union of their target sets.

    Args:
        adapters: Adapters with factors loaded.
        weights: one finite float per adapter (default all 1).
        method: a key of METHODS.
        rank: output rank per block group (required for svd, ties, dare).
        density: fraction kept, 0 < density <= 1 (required for ties and dare).
        seed: seed of dare's masks.
        names: how messages name each adapter (default "adapter 1", ...).
        progress: optional callable, called once per target.
    Returns:
        CombineResult: the adapter (user metadata empty, loratool.info records the method and parameters)
        and one row per target (rank_before = sum of input ranks, rank_after, energy_retained).
    Raises:
        MismatchError: a target disagrees across adapters (kind, layout, shape, base fingerprint).
        NumericError: a weight, density or rank is out of range, or a result is not finite.
        ValueError: the arguments do not fit together (a programming error; the CLI checks them first).
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("combine needs at least one adapter")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    names = list(names) if names is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    for w in weights:
        if not math.isfinite(w):
            raise NumericError(f"weight {w} is not a finite number; pass finite weights")
    if method != "concat" and (rank is None or int(rank) < 1):
        raise NumericError(f"method {method} needs a rank of at least 1 (got {rank})")
    if method in ("ties", "dare") and (density is None or not 0.0 < float(density) <= 1.0):
        raise NumericError(f"method {method} needs a density in (0, 1] (got {density})")
    aligned = aligned_targets(adapters, names)
    targets, rows = [], []
    for key, items in aligned.items():
        rank_before = sum(t.rank for _, t in items)
        if method in ("ties", "dare"):
            nt, row = _dense_target(key, items, weights, method, rank, float(density), seed)
        else:
            nt = concat_target(key, items, weights)
            row = {"target": key, "kind": nt.kind, "rank_before": rank_before if nt.kind != "full" else None,
                   "rank_after": nt.rank if nt.kind != "full" else None, "energy_retained": 1.0,
                   "relative_error": 0.0}
            if method == "svd" and nt.kind != "full":
                nt, row = truncate_target(nt, rank=int(rank))
        row["adapters"] = [i for i, _ in items]
        targets.append(nt)
        rows.append(row)
        if progress is not None:
            progress(1)
    info = {"combine": {"method": method, "weights": weights}}
    if rank is not None and method != "concat":
        info["combine"]["rank"] = int(rank)
    if method in ("ties", "dare"):
        info["combine"]["density"] = float(density)
    if method == "dare":
        info["combine"]["seed"] = int(seed)
    return CombineResult(Adapter(targets={t.key: t for t in targets}, metadata={}, info=info), rows)


__all__ = ["CombineResult", "METHODS", "combine", "concat_target", "aligned_targets", "ties_merge", "dare_merge",
           "trim"]
