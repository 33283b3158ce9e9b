"""Combine adapters into one, target by target, through the registry of methods (ops/combine_methods.py).

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

Everything is computed in float32 with numpy; factors held as torch tensors are accepted and converted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..adapter import Adapter, Target
from ..container import escape
from ..errors import UnsupportedError, MismatchError, NumericError
from .combine_methods import DEFAULT, METHODS, Options


@dataclass
class CombineResult:
    """The combined adapter and what the CLI reports about it (plain data, ready for a table or JSON).

    `rows` has one dict per target: target, kind, adapters (indices of the inputs that have it), rank_before
    (the sum of the input ranks), rank_after, energy_retained and relative_error (0 for exact methods).
    """

    adapter: Adapter
    rows: list[dict] = field(default_factory=list)
    inputs: int = 0  # how many adapters were combined
    output: str | None = None  # where loratool.combine wrote the adapter, if it did
    to: str | None = None  # the dialect it was written in
    bytes: int = 0  # bytes written

    def report(self) -> dict:
        """The method, weights and method parameters (as loratool.info["combine"] records them), the output's
        parameter count and the per-target rows."""
        return {"output": self.output, "to": self.to, "bytes": self.bytes, **self.adapter.info["combine"],
                "parameters": self.adapter.n_params, "targets": self.rows}


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
        for i, t in items:
            if t.is_dora or t.kind not in ("lora", "full"):
                why = ("DoRA's merge W' = m/‖W + ΔW‖·(W + ΔW) is not a sum of deltas" if t.is_dora else
                       f"a {t.kind} delta is not a sum of low-rank pairs, so no combined pair or factor set holds "
                       "the weighted sum exactly")
                fix = "merge the adapters one after another" if t.is_dora else \
                    "convert it to LoRA first (loratool convert --rank N) or merge the adapters one after another"
                raise UnsupportedError(f"target \"{escape(key)}\" of {names[i]} is {t.kind}: {why}; {fix}")
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


def _options(method: str, rank, density, seed) -> Options:
    """Check the parameters against the method's registry entry and their ranges."""
    m = METHODS[method]
    for name, value in (("rank", rank), ("density", density)):
        if value is not None and m.parameter(name) is None:
            raise ValueError(f"method {method} does not take {name}; drop it")
    if m.parameter("rank") is not None and (rank is None or int(rank) < 1):
        raise NumericError(f"method {method} needs a rank of at least 1 (got {rank})")
    if m.parameter("density") is not None and (density is None or not 0.0 < float(density) <= 1.0):
        raise NumericError(f"method {method} needs a density in (0, 1] (got {density})")
    return Options(rank=None if rank is None else int(rank), density=None if density is None else float(density),
                   seed=int(seed))


def combine(adapters, weights=None, method: str = DEFAULT, rank: int | None = None,
            density: float | None = None, seed: int = 0, names=None, progress=None) -> CombineResult:
    """Combine in-memory adapters target by target over the union of their target sets.

    Args:
        adapters: Adapters with factors loaded (numpy arrays or torch tensors).
        weights: one finite float per adapter (default all 1).
        method: a name registered in ops.combine_methods.METHODS (concat, svd, ties, dare).
        rank: output rank per block group (methods that take it: svd, ties, dare).
        density: fraction kept, 0 < density <= 1 (ties and dare).
        seed: seed of dare's masks.
        names: how messages name each adapter (default "adapter 1", ...).
        progress: optional callable progress(advance, total=None): once with total= the number of targets,
            then once per target.
    Returns:
        CombineResult: the adapter (factors as numpy arrays, user metadata empty, loratool.info records the
        method and parameters) and one row per target.
    Raises:
        MismatchError: a target disagrees across adapters (kind, layout, shape, base fingerprint).
        NumericError: a weight, density or rank is out of range, or a result is not finite.
        ValueError: the arguments do not fit together (a programming error; the CLI checks them first).
    """
    adapters = [a.as_numpy() for a in adapters]
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
    opts = _options(method, rank, density, seed)
    run = METHODS[method].run
    aligned = aligned_targets(adapters, names)
    if progress is not None:
        progress(0, total=len(aligned))
    targets, rows = [], []
    for key, items in aligned.items():
        nt, row = run(key, items, weights, opts)
        row["adapters"] = [i for i, _ in items]
        targets.append(nt)
        rows.append(row)
        if progress is not None:
            progress(1)
    info = {"method": method, "weights": weights}
    for p in METHODS[method].parameters:
        info[p.name] = getattr(opts, p.name)
    return CombineResult(Adapter(targets={t.key: t for t in targets}, metadata={}, info={"combine": info}), rows,
                         inputs=len(adapters))


__all__ = ["CombineResult", "combine", "aligned_targets"]
