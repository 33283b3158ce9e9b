"""The combine methods: one registered unit per method (name, parameters and their meaning, paper, function).

`combine()` (ops/combine.py) dispatches through METHODS; the CLI's `--method` choices, its help text and its
checks of which option goes with which method read it too, and a test checks that README's combine section
lists the same methods, papers and required options.

Notation: adapter i has weight w_i and, on a target, matrix-view delta ΔW_i (zero when it lacks the target);
τ_i = w_i ΔW_i. A method's function gets one target's inputs, [(adapter index, Target)], and returns the
combined Target (user info cleared, base fingerprint kept) with its report row. Compressed blocks follow
ops/factored.py: a group whose blocks share one scale keeps it, otherwise the new block has scale 1.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..adapter import Target
from ..container import escape
from ..dtypes import as_f32
from ..errors import NumericError
from .factored import factor_dtype, promoted_dtype, truncate_target, truncate_target_dense
from .linalg import delta_matrix

F32 = np.float32


@dataclass(frozen=True)
class Options:
    """The values of the method parameters for one call (None where not given)."""

    rank: int | None = None
    density: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Parameter:
    """A parameter a method takes: `name` is the keyword of combine() and the CLI flag --name."""

    name: str
    meaning: str  # what it means for this method
    required: bool = True


@dataclass(frozen=True)
class CombineMethod:
    """One combine method. `run(key, items, weights, options) -> (Target, row)` combines one target."""

    name: str
    description: str  # the paragraph of `loratool combine --help`: what the result is
    parameters: tuple[Parameter, ...]
    run: Callable
    paper: str | None = None  # authors, year and title of the paper the method follows
    arxiv: str | None = None  # its arXiv id

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)


METHODS: dict[str, CombineMethod] = {}
DEFAULT = "concat"
PARAMETER_NAMES = ("rank", "density", "seed")  # every parameter some method takes, in the CLI's order


def register(method: CombineMethod) -> CombineMethod:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"combine method {method.name!r} is registered twice")
    unknown = {p.name for p in method.parameters} - set(PARAMETER_NAMES)
    if unknown:
        raise ValueError(f"combine method {method.name!r} takes unknown parameters {sorted(unknown)}")
    METHODS[method.name] = method
    return method


def _join(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def usage_problem(method: str, given) -> str | None:
    """The first mismatch between a method and the parameters given (a set of names), as the CLI says it:
    a parameter the method does not take, or a required one that is missing; None when they fit."""
    m = METHODS[method]
    for name in PARAMETER_NAMES:
        p = m.parameter(name)
        if name in given and p is None:
            takers = [x.name for x in METHODS.values() if x.parameter(name) is not None]
            return f"--{name} applies to --method {_join(takers)}"
        if p is not None and p.required and name not in given:
            return f"--method {method} needs --{name}"
    return None


# ---------------------------------------------------------------- shared pieces


def fingerprint(items) -> dict:
    """The recorded base fingerprint of a target: the first input's that has one, per field."""
    fp = {}
    for f in ("dtype", "sha256"):
        vals = [getattr(t, f) for _, t in items if getattr(t, f) is not None]
        fp[f] = vals[0] if vals else None
    return fp


def _exact_row(key: str, t: Target, rank_before: int) -> dict:
    lora = t.kind != "full"
    return {"target": key, "kind": t.kind, "rank_before": rank_before if lora else None,
            "rank_after": t.rank if lora else None, "energy_retained": 1.0, "relative_error": 0.0}


def concat_target(key: str, items, weights) -> Target:
    """Σ w_i ΔW_i of one target, exactly: blocks appended with alpha * w (factors untouched)."""
    t0 = items[0][1]
    fp = fingerprint(items)
    if t0.kind == "full":
        if len(items) == 1:
            i, t = items[0]
            return replace(t, delta_scale=t.delta_scale * weights[i], info={}, **fp)
        # (shape) float32 sum, cast once to the inputs' promoted dtype
        D = sum(as_f32(t.delta) * F32(t.delta_scale * weights[i]) for i, t in items)
        return replace(t0, delta=D.astype(promoted_dtype(t.delta for _, t in items)), delta_scale=1.0, info={}, **fp)
    blocks = [replace(b, alpha=b.alpha * weights[i]) for i, t in items for b in t.blocks]
    return replace(t0, blocks=tuple(blocks), info={}, **fp)


def task_vectors(items, weights) -> list[np.ndarray]:
    """Dense float32 τ_i = w_i ΔW_i (matrix view for lora targets, own shape for full ones)."""
    out = []
    for i, t in items:
        if t.kind == "full":
            out.append(as_f32(t.delta) * F32(t.delta_scale * weights[i]))
        else:
            out.append(delta_matrix(t) * F32(weights[i]))  # (out, in)
    return out


def support(t: Target) -> np.ndarray:
    """Boolean mask of the entries a target can change (the union of its block rectangles)."""
    if t.kind == "full":
        return np.ones(t.shape, bool)
    m = np.zeros(t.matrix_shape, bool)
    for b in t.blocks:
        m[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] = True
    return m


def _dense_target(key, items, merged: np.ndarray, rank: int) -> tuple[Target, dict]:
    """The target holding a dense merged delta: cast for a full target, truncated per block group otherwise."""
    t0 = items[0][1]
    fp = fingerprint(items)
    if t0.kind == "full":
        dtype = promoted_dtype(t.delta for _, t in items)
        D = merged.astype(dtype)
        if not bool(np.isfinite(D).all()):
            raise NumericError(f"target \"{escape(key)}\": the merged delta is not finite in {dtype}")
        row = {"target": key, "kind": "full", "rank_before": None, "rank_after": None, "energy_retained": 1.0,
               "relative_error": 0.0}
        return replace(t0, delta=D, delta_scale=1.0, info={}, **fp), row
    rects = [(b.rows, b.cols) for _, t in items for b in t.blocks]
    dtype = factor_dtype(b for _, t in items for b in t.blocks)
    base = replace(t0, info={}, **fp)
    return truncate_target_dense(base, merged, rects, rank, None, dtype, sum(t.rank for _, t in items))


# ---------------------------------------------------------------- concat and svd


def _concat(key, items, weights, opts: Options):
    t = concat_target(key, items, weights)
    return t, _exact_row(key, t, sum(x.rank for _, x in items))


def _svd(key, items, weights, opts: Options):
    t = concat_target(key, items, weights)
    if t.kind == "full":
        return t, _exact_row(key, t, 0)
    return truncate_target(t, rank=int(opts.rank))


# ---------------------------------------------------------------- TIES


def trim(tau: np.ndarray, n: int, density: float) -> np.ndarray:
    """TIES step 1: keep the round(density * n) entries of largest magnitude (at least 1), zero the rest.

    round() rounds halves up here (floor(x + 0.5)), not to even as Python's round does.
    """
    k = max(1, min(tau.size, math.floor(density * n + 0.5)))
    flat = tau.reshape(-1)
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]  # the k largest, in no order
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(tau.shape)


def ties_merge(taus, ns, density: float) -> np.ndarray:
    """TIES-Merging of weighted task vectors: trim, elect the sign by total mass, disjoint mean.

    Args:
        taus: the τ_i, float32 arrays of one shape. ns: the entries each adapter can change.
    Returns:
        float32 array of the same shape.
    """
    trimmed = [trim(t, n, density) for t, n in zip(taus, ns)]
    gamma = np.where(sum(trimmed) >= 0, F32(1.0), F32(-1.0))  # elected sign per entry; 0 counts as +
    total = np.zeros_like(trimmed[0])
    count = np.zeros_like(trimmed[0])
    for t in trimmed:
        agree = np.sign(t) == gamma  # zeros never agree: they were trimmed or never there
        total += np.where(agree, t, F32(0.0))
        count += agree
    return total / np.maximum(count, F32(1.0))


def _ties(key, items, weights, opts: Options):
    taus = task_vectors(items, weights)
    merged = ties_merge(taus, [int(support(t).sum()) for _, t in items], float(opts.density))
    return _dense_target(key, items, merged, opts.rank)


# ---------------------------------------------------------------- DARE


def mask_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of a target's masks: seeded by (seed, target key), so a target's masks do not depend on
    which other targets the adapters have."""
    return np.random.default_rng((int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**63))


def dare_merge(taus, density: float, seed: int, key: str) -> np.ndarray:
    """DARE drop-and-rescale of each weighted task vector (adapters in order), then their sum (float32)."""
    rng = mask_rng(seed, key)
    total = np.zeros_like(taus[0])
    for t in taus:
        keep = rng.random(t.shape, dtype=np.float32) < density  # Bernoulli(density) per entry
        total += np.where(keep, t, F32(0.0)) / F32(density)
    return total


def _dare(key, items, weights, opts: Options):
    merged = dare_merge(task_vectors(items, weights), float(opts.density), opts.seed, key)
    return _dense_target(key, items, merged, opts.rank)


# ---------------------------------------------------------------- the registry

register(CombineMethod(
    name="concat",
    description="exactly Σ w_i ΔW_i. Blocks are appended with alpha_i·w_i, factors unchanged, so there are no "
                "cross terms B_i·A_j and no rsLoRA over-scaling. The output rank is the sum of the input ranks.",
    parameters=(),
    run=_concat,
))
register(CombineMethod(
    name="svd",
    description="the concat sum truncated to --rank per block group from the factors (never out x in); a group "
                "whose blocks share one scale keeps it, otherwise the new block has alpha = rank (scale 1).",
    parameters=(Parameter("rank", "singular values kept per block group, computed from the factors"),),
    run=_svd,
))
register(CombineMethod(
    name="ties",
    description="TIES-Merging on τ_i = w_i·ΔW_i, dense per target: keep the top --density fraction of each τ_i "
                "by magnitude, elect the sign of Σ τ_i per entry, and average the kept τ_i that agree with it "
                "(mean over the agreeing adapters only); then truncate to --rank (new blocks have scale 1).",
    parameters=(Parameter("rank", "singular values kept per block group of the dense result"),
                Parameter("density", "fraction of the entries each adapter can change that trim keeps")),
    run=_ties,
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
    arxiv="2306.01708",
))
register(CombineMethod(
    name="dare",
    description="DARE, then task arithmetic: drop each entry of each ΔW_i with probability 1−density, divide "
                "the rest by density, and sum with the weights (PEFT's dare_linear); masks seeded by --seed and "
                "the target key; then truncate to --rank (new blocks have scale 1).",
    parameters=(Parameter("rank", "singular values kept per block group of the dense result"),
                Parameter("density", "probability that an entry is kept (the rest are dropped)"),
                Parameter("seed", "seed of the masks, with the target key (default 0)", required=False)),
    run=_dare,
    paper="Yu et al. 2023, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a "
          "Free Lunch",
    arxiv="2311.03099",
))

__all__ = ["METHODS", "DEFAULT", "PARAMETER_NAMES", "CombineMethod", "Parameter", "Options", "register",
           "usage_problem", "concat_target", "task_vectors", "support", "trim", "ties_merge", "dare_merge",
           "mask_rng", "fingerprint"]
