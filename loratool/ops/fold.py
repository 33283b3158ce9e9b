"""Fold a target's blocks into one A/B pair over the whole weight, with the same delta: how an exact combine or
a target-index adapter reaches dialects that hold one pair per module (PEFT, kohya, and what reads them).

A target holds blocks M[rows_i, cols_i] += s_i B_i A_i. Zero-padded to the whole matrix view (out, in),

    ΔM = Σ_i s_i pad(B_i) pad(A_i) = B A,   B = [s_1 pad(B_1) | ... | s_k pad(B_k)]  (out, R)
                                              A = [pad(A_1); ...; pad(A_k)]          (R, in)

with R = Σ r_i, pad(B_i) = B_i in rows_i and zero elsewhere, pad(A_i) = A_i in cols_i and zero elsewhere. So

  - blocks over the same rectangle (a `concat` of two adapters on one weight) stack along the rank axis;
  - blocks over disjoint row ranges (a fused qkv adapted slice by slice) give a block-diagonal B;
  - column blocks give a block-diagonal A.

Each zero contributes an exact 0 to every product term, so the fold is exact in all three cases; the price is
the rank, which grows to R (the zeros are stored).

Scales. The folded pair has one scale c, written as alpha = c·R (alpha = c·√R under rsLoRA, when every block
is rsLoRA; the standard rule otherwise), and each B_i is multiplied by s_i / c:

  - exact: when every s_i / c is a power of two (or 0), B_i·(s_i / c) is exact in the factors' own dtype (a
    power of two moves the exponent only), unless it overflows or becomes subnormal, which is checked element
    by element. c is 1 (alpha = R) when that works, else the first block scale that makes it work. The folded
    factors keep the blocks' dtype (their promoted dtype when they differ: float32, or float64 if any is),
    and A is copied bit for bit;
  - rounded: otherwise (weights such as 0.7 and 0.3 on equal scales) c = 1 and each B_i·s_i is computed in
    float64 and rounded once to float32 (float64 if a factor is float64), so the folded delta is the blocks'
    delta to within float32 rounding of each factor entry (relative 2^-24), and the factors are float32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..adapter import EXPERT_LAYOUTS, Adapter, Block, Target, alpha_for_scale, scale_of
from ..container import escape
from ..errors import NumericError
from .factored import factor_dtype
from .linalg import held

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _power_of_two(x: float) -> bool:
    """x = ±2^k (0 also passes: that block adds nothing, and B·0 is exactly 0)."""
    return x == 0.0 or (math.isfinite(x) and abs(math.frexp(x)[0]) == 0.5)


def _scale_left(scales, rank: int, rule: str) -> float | None:
    """The scale c kept in alpha for which every s_i / c is a power of two and alpha = c·R (or c·√R) gives
    back c exactly under `rule`: 1 if it works, else the first block scale that does; None when none does."""
    for c in (1.0, *scales):
        if c == 0.0 or not math.isfinite(c):
            continue
        if scale_of(alpha_for_scale(c, rank, rule), rank, rule) != c:
            continue
        if all(_power_of_two(s / c) for s in scales):
            return c
    return None


def _times(B, ratio: float, dtype) -> np.ndarray | None:
    """B·ratio in `dtype` when that is exact (ratio a power of two, no overflow or underflow), else None."""
    B64 = np.asarray(held(B), dtype=F64)  # exact from every float dtype loratool holds
    if ratio == 1.0:
        return np.asarray(held(B)).astype(dtype)  # exact: dtype is the blocks' promoted dtype
    want = B64 * ratio  # exact in float64 for a power of two
    got = want.astype(dtype)
    if not bool(np.all(got.astype(F64) == want)):
        return None
    return got


def fold_target(t: Target) -> Target:
    """One block over the whole matrix view with the same delta as `t`'s blocks (see the module docstring).

    Args:
        t: a target with its factors loaded (numpy arrays or torch tensors). A full target, or a lora target
            that is already one whole block, is returned as it is.
    Returns:
        The target with one block of rank Σ r_i, factors numpy arrays; info["folded"] records how many blocks
        were folded and whether the factors are exact ("exact") or B was rounded to float32 ("rounded").
    Raises:
        NumericError: a folded factor is not finite (B_i·s_i overflows float32).
    """
    if t.kind != "lora" or t.is_whole or not t.blocks:
        return t
    blocks = t.blocks
    out, inp = t.matrix_shape
    R = t.rank
    rules = {b.scale_rule for b in blocks}
    rule = rules.pop() if len(rules) == 1 else "standard"
    scales = [b.scale for b in blocks]
    dtype = factor_dtype(blocks)
    c = _scale_left(scales, R, rule)
    parts = None
    if c is not None:
        parts = [_times(b.B, s / c, dtype) for b, s in zip(blocks, scales)]
        if any(p is None for p in parts):
            parts = None
    how = "exact"
    if parts is None:  # no power-of-two split: fold the scales into B, rounded once
        how, c = "rounded", 1.0
        dtype = F64 if dtype == F64 else F32
        parts = [(np.asarray(held(b.B), dtype=F64) * s).astype(dtype) for b, s in zip(blocks, scales)]
    Bf = np.zeros((out, R), dtype)
    Af = np.zeros((R, inp), dtype)
    k = 0
    for b, Bi in zip(blocks, parts):
        Bf[b.rows[0]:b.rows[1], k:k + b.rank] = Bi  # (rows_i, r_i) into rows_i
        Af[k:k + b.rank, b.cols[0]:b.cols[1]] = np.asarray(held(b.A)).astype(dtype)  # (r_i, cols_i) into cols_i
        k += b.rank
    if not bool(np.isfinite(Bf.astype(F64)).all()):
        raise NumericError(f"target \"{escape(t.key)}\": folding its {len(blocks)} blocks into one pair overflows "
                           f"{dtype} (a block scale times its lora_B); rescale the adapter down first")
    block = replace(blocks[0], rank=R, alpha=alpha_for_scale(c, R, rule), scale_rule=rule, rows=(0, out),
                    cols=(0, inp), A=Af, B=Bf)
    info = {**dict(t.info), "folded": {"blocks": len(blocks), "rank": R, "factors": how}}
    return replace(t, blocks=(block,), info=info)


def fold_experts(t: Target) -> Target:
    """A fused expert target (layout "experts"/"experts_t") with the same delta in the form PEFT's ParamWrapper
    holds (adapter.is_per_expert): one block per expert over its whole (out, in) matrix, all of one rank R and
    one scale.

    Expert e's blocks fold as `fold_target` folds a target's (stacked along the rank, zero-padded to the
    expert's matrix); every expert is then zero-padded to R = the largest expert's Σ r_i (an expert without a
    block gets zero factors: it adds nothing). One scale c is kept for all of them, as in `fold_target`: exact
    when every s_i / c is a power of two, else B_i·s_i rounded once to float32 (the module docstring).

    Raises:
        UnsupportedError: a block spans two experts (no per-expert pair holds it).
        NumericError: a folded factor is not finite.
    """
    from ..adapter import expert_of, expert_span, is_per_expert
    from ..errors import UnsupportedError

    if t.kind != "lora" or is_per_expert(t):
        return t
    E = t.shape[0]
    spans = [expert_span(t.layout, t.shape, e) for e in range(E)]
    per: list[list] = [[] for _ in range(E)]
    for b in t.blocks:
        e = expert_of(t.layout, t.shape, b)
        if e is None:
            raise UnsupportedError(f"target \"{escape(t.key)}\": a block at rows {b.rows[0]}:{b.rows[1]} cols "
                                   f"{b.cols[0]}:{b.cols[1]} spans two experts; PEFT holds one pair per expert")
        per[e].append(b)
    R = max(1, max(sum(b.rank for b in bs) for bs in per))
    rules = {b.scale_rule for b in t.blocks}
    rule = rules.pop() if len(rules) == 1 else "standard"
    scales = [b.scale for b in t.blocks]
    dtype = factor_dtype(t.blocks) if t.blocks else F32
    c = _scale_left(scales, R, rule)
    parts = None if c is None else {id(b): _times(b.B, s / c, dtype) for b, s in zip(t.blocks, scales)}
    how = "exact"
    if parts is None or any(p is None for p in parts.values()):
        how, c = "rounded", 1.0
        dtype = F64 if dtype == F64 else F32
        parts = {id(b): (np.asarray(held(b.B), dtype=F64) * s).astype(dtype) for b, s in zip(t.blocks, scales)}
    blocks = []
    for (rows, cols), bs in zip(spans, per):
        Be = np.zeros((rows[1] - rows[0], R), dtype)  # (out, R)
        Ae = np.zeros((R, cols[1] - cols[0]), dtype)  # (R, in)
        k = 0
        for b in bs:
            r0, c0 = b.rows[0] - rows[0], b.cols[0] - cols[0]
            Be[r0:r0 + b.n_rows, k:k + b.rank] = parts[id(b)]
            Ae[k:k + b.rank, c0:c0 + b.n_cols] = np.asarray(held(b.A)).astype(dtype)
            k += b.rank
        if not bool(np.isfinite(Be.astype(F64)).all()):
            raise NumericError(f"target \"{escape(t.key)}\": folding its blocks into one pair per expert overflows "
                               f"{dtype} (a block scale times its lora_B); rescale the adapter down first")
        blocks.append(Block(rank=R, alpha=alpha_for_scale(c, R, rule), scale_rule=rule, rows=rows, cols=cols,
                            A=Ae, B=Be))
    info = {**dict(t.info), "folded": {"blocks": len(t.blocks), "rank": R, "factors": how, "per_expert": True}}
    return replace(t, blocks=tuple(blocks), info=info)


def fold_adapter(adapter: Adapter, keep=None) -> tuple[Adapter, list[str]]:
    """The adapter with every lora target folded into one whole pair (fold_target), except those `keep` holds.

    Args:
        adapter: an adapter with its factors loaded.
        keep: optional predicate Target -> bool: True leaves the target as it is (a writer that holds it).
    Returns:
        The adapter (factors as numpy arrays) and the keys of the targets folded, in order.
    """
    adapter = adapter.as_numpy()
    folded, targets = [], []
    for t in adapter:
        if t.kind == "lora" and not t.is_whole and t.blocks and not (keep is not None and keep(t)):
            # a fused expert tensor keeps one pair per expert (what PEFT's ParamWrapper holds)
            t = fold_experts(t) if t.layout in EXPERT_LAYOUTS else fold_target(t)
            folded.append(t.key)
        targets.append(t)
    return (adapter.replace_targets(targets) if folded else adapter), folded


__all__ = ["fold_target", "fold_experts", "fold_adapter"]
