"""Truncation of a target's delta, shared by `rescale --rank/--energy` and `combine --method svd|ties|dare`.

A target's blocks are first merged into *groups*: blocks whose rectangles intersect join one group whose
rectangle is their bounding box, until the groups' rectangles are pairwise disjoint. Each group is then
truncated on its own rectangle, so

  - a whole-matrix target (PEFT, kohya) is one group: the result is the Eckart-Young truncation of ΔM;
  - a target-index target with disjoint blocks (loralib `enable_lora`, fused qkv) keeps one block per
    slice, each the Eckart-Young truncation of that slice: no B rows of zeros for the slices it never touched;
  - blocks that overlap (a `concat` of two adapters) collapse into one block over their bounding box.

Because group rectangles are disjoint, ||ΔM||_F^2 is the sum over groups, so the retained energy of a target
is the sum of what each group keeps over the sum of what each group had.

A compressed block keeps the common scale of the blocks it replaces (alpha_new = scale * r_new, or
scale * sqrt(r_new) for rsLoRA, as kohya's resize does), so `inspect` shows the same strength before and after.
When those blocks differ in scale or scale rule, or their scale is 0, the new block has scale 1
(alpha = r_new, rule "standard"), as every extractor writes. Singular values are split evenly between the
factors (B = U sqrt(S/|s|), A = sqrt(S/|s|) Vh), which keeps both factors at the same magnitude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..adapter import Block, Target, alpha_for_scale
from ..container import escape
from ..dtypes import NP_DTYPES, dtype_of
from ..errors import NumericError
from .linalg import energy_rank, factored_svd, held, rect_factors

Rect = tuple[tuple[int, int], tuple[int, int]]  # (rows [start, stop), cols [start, stop)) of the matrix view


def _intersects(a: Rect, b: Rect) -> bool:
    (ar, ac), (br, bc) = a, b
    return ar[0] < br[1] and br[0] < ar[1] and ac[0] < bc[1] and bc[0] < ac[1]


def _bbox(a: Rect, b: Rect) -> Rect:
    (ar, ac), (br, bc) = a, b
    return (min(ar[0], br[0]), max(ar[1], br[1])), (min(ac[0], bc[0]), max(ac[1], bc[1]))


def group_rects(rects: list[Rect]) -> list[tuple[Rect, list[int]]]:
    """Merge intersecting rectangles into groups with pairwise disjoint bounding boxes.

    Args:
        rects: the rectangles of a target's blocks, in block order.
    Returns:
        (bounding rectangle, indices of the member rectangles) per group, sorted by rectangle.
    """
    groups: list[tuple[Rect, list[int]]] = []
    for i, r in enumerate(rects):
        rect, members = r, [i]
        merged = True
        while merged:  # a grown box may now meet groups it missed before
            merged = False
            for j, (g, m) in enumerate(groups):
                if _intersects(rect, g):
                    rect, members = _bbox(rect, g), sorted(m + members)
                    del groups[j]
                    merged = True
                    break
        groups.append((rect, members))
    return sorted(groups)


def choose_rank(S: np.ndarray, rank: int | None = None, energy: float | None = None) -> int:
    """How many singular values to keep: min(rank, len(S)), or the smallest k reaching `energy` (at least 1)."""
    if rank is not None:
        return max(1, min(int(rank), S.size))
    return max(1, energy_rank(S, float(energy)))


def common_scale(blocks) -> tuple[float, str] | None:
    """(scale, scale_rule) shared by all blocks, or None when they differ or the scale is 0."""
    rules = {b.scale_rule for b in blocks}
    scales = {b.scale for b in blocks}
    if len(rules) == 1 and len(scales) == 1:
        s = scales.pop()
        if s != 0.0 and math.isfinite(s):
            return s, rules.pop()
    return None


def promoted_dtype(tensors) -> np.dtype:
    """The dtype the tensors (numpy or torch) promote to, as numpy: the one cast at the end.

    float64 wins; two different dtypes otherwise give float32 (as torch promotes bfloat16 with float16, for
    which numpy has no common type); none gives float32.
    """
    names = {dtype_of(held(x)) for x in tensors}
    if "F64" in names:
        return NP_DTYPES["F64"]
    if len(names) == 1:
        return NP_DTYPES[names.pop()]
    return NP_DTYPES["F32"]


def factor_dtype(blocks) -> np.dtype:
    """The promoted dtype of the blocks' factors: the one cast at the end."""
    return promoted_dtype(x for b in blocks for x in (b.A, b.B))


def _finite(x) -> bool:
    return bool(np.isfinite(held(x)).all())


def block_from_svd(U, S, Vh, k: int, rect: Rect, keep: tuple[float, str] | None, dtype) -> Block:
    """A rank-k block on `rect` from an SVD (U (h, n), S (n,), Vh (n, w)), scale kept as `keep` says."""
    s, rule = keep if keep is not None else (1.0, "standard")
    c = np.sqrt(S[:k] / np.float32(abs(s)))  # (k,) float32
    B = U[:, :k] * c * np.float32(math.copysign(1.0, s))  # (h, k)
    A = c[:, None] * Vh[:k]  # (k, w)
    # astype rounds once to the factors' dtype (ml_dtypes: to nearest even, as torch's .to does)
    return Block(rank=k, alpha=alpha_for_scale(s, k, rule), scale_rule=rule, rows=rect[0], cols=rect[1],
                 A=np.ascontiguousarray(A.astype(dtype)), B=np.ascontiguousarray(B.astype(dtype)))


def _energy(S: np.ndarray) -> float:
    """Σ S² in float64."""
    S = S.astype(np.float64)
    return float(S @ S)


@dataclass
class GroupResult:
    block: Block
    energy: float  # ||group delta||_F^2 before (float64 sum)
    kept: float  # the part of it the new block keeps


def truncate_group(blocks, rect: Rect, rank: int | None, energy: float | None) -> GroupResult:
    """Optimal (Eckart-Young) truncation of the blocks' summed delta on `rect`, from the factors only.

    A single block already at or below the requested rank is returned unchanged (bit-exact).
    """
    Bs, As = rect_factors(blocks, rect)  # (h, R), (R, w)
    U, S, Vh = factored_svd(Bs, As)  # never (h, w)
    total = _energy(S)
    k = choose_rank(S, rank, energy)
    if len(blocks) == 1 and k >= blocks[0].rank:
        return GroupResult(blocks[0], total, total)
    kept = _energy(S[:k])
    return GroupResult(block_from_svd(U, S, Vh, k, rect, common_scale(blocks), factor_dtype(blocks)), total, kept)


def truncate_dense(M: np.ndarray, rect: Rect, rank: int | None, energy: float | None, dtype) -> GroupResult:
    """Optimal truncation of a dense float32 matrix-view delta restricted to `rect` (for ties/dare results)."""
    (r0, r1), (c0, c1) = rect
    U, S, Vh = np.linalg.svd(M[r0:r1, c0:c1], full_matrices=False)  # (h, n), (n,), (n, w)
    total = _energy(S)
    k = choose_rank(S, rank, energy)
    kept = _energy(S[:k])
    return GroupResult(block_from_svd(U, S, Vh, k, rect, None, dtype), total, kept)


def _finish(t: Target, results: list[GroupResult], rank_before: int) -> tuple[Target, dict]:
    total = sum(r.energy for r in results)
    kept = sum(r.kept for r in results)
    retained = 1.0 if total == 0.0 else min(kept / total, 1.0)
    blocks = [r.block for r in results]
    for b in blocks:
        for x in (b.A, b.B):
            if not _finite(x):
                raise NumericError(f"target \"{escape(t.key)}\": truncated factors are not finite after the cast to "
                                   f"{x.dtype}; the delta overflows that dtype")
    info = {**dict(t.info), "energy_retained": retained, "rank_before": rank_before}
    new = replace(t, blocks=tuple(blocks), info=info)
    row = {"target": t.key, "kind": t.kind, "rank_before": rank_before, "rank_after": new.rank,
           "blocks_before": len(t.blocks), "blocks_after": len(blocks), "energy_retained": retained,
           "relative_error": math.sqrt(max(1.0 - retained, 0.0))}
    return new, row


def truncate_target(t: Target, rank: int | None = None, energy: float | None = None) -> tuple[Target, dict]:
    """Truncate a lora target group by group (see the module docstring), from its factors.

    Args:
        t: a lora target with its factors loaded.
        rank: keep at most this many singular values per group; or
        energy: keep the fewest singular values per group that retain this fraction of its ||·||_F^2.
    Returns:
        The new target (Target.info gains energy_retained and rank_before) and a report row.
    """
    for i, b in enumerate(t.blocks):
        if not (_finite(b.A) and _finite(b.B)):
            raise NumericError(f"target \"{escape(t.key)}\": block {i} has non-finite factors, so its delta has no "
                               "truncation; fix or drop that target first")
    groups = group_rects([(b.rows, b.cols) for b in t.blocks])
    results = [truncate_group([t.blocks[i] for i in members], rect, rank, energy) for rect, members in groups]
    return _finish(t, results, t.rank)


def truncate_target_dense(t: Target, M: np.ndarray, rects: list[Rect], rank: int | None, energy: float | None,
                          dtype, rank_before: int) -> tuple[Target, dict]:
    """Replace `t`'s blocks by the truncation of the dense matrix-view delta M (out, in) on the groups of `rects`.

    M must be zero outside the union of `rects` (ties and dare never create entries where no input had one).
    """
    if not _finite(M):
        raise NumericError(f"target \"{escape(t.key)}\": the merged delta is not finite; check the inputs' factors "
                           "and weights")
    groups = group_rects(rects)
    results = [truncate_dense(M, rect, rank, energy, dtype) for rect, _ in groups]
    return _finish(t, results, rank_before)


__all__ = ["Rect", "group_rects", "rect_factors", "choose_rank", "common_scale", "promoted_dtype", "factor_dtype",
           "block_from_svd", "truncate_group", "truncate_dense", "truncate_target", "truncate_target_dense"]
