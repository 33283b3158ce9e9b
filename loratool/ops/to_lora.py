"""LyCORIS targets (LoHa, LoKr, LoCon-Tucker) as LoRA: the optimal factored truncation of the exact dense ΔW
(ops/kinds.py), with the error measured on the factors written and the optimum of the exact SVD reported."""

from __future__ import annotations

import math

import numpy as np

from ..adapter import Target
from .kinds import dense_matrix, relative_error


def to_lora_target(t: Target, rank: int | None = None, energy: float | None = None) -> tuple[Target, dict]:
    """The optimal rank-k LoRA of a LyCORIS target (Eckart–Young): the SVD of its exact dense ΔM, truncated.

    Args:
        t: a loha, lokr or tucker target with its factors loaded (no DoRA magnitude).
        rank: keep k = min(rank, rank of ΔM) singular values; or
        energy: keep the fewest that retain this fraction of ‖ΔM‖²_F.
    Returns:
        (a "lora" target with one block over M, alpha = k so its scale is 1, B = U_k·diag(S_k) and A = V_kᵀ in
        float32; its report row: target, kind, rank_after, relative_error measured on the float32 factors
        written (‖ΔM − B A‖_F / ‖ΔM‖_F, float64), optimal_error (√(Σ_{i>k} σ_i²) / ‖ΔM‖_F of the exact SVD),
        energy_retained).
    Raises:
        UnsupportedError: the target is DoRA (its merge is not W + low rank) or not a LyCORIS kind.
    """
    from dataclasses import replace

    from ..adapter import Block
    from ..errors import UnsupportedError
    from .linalg import energy_rank

    if t.is_dora:
        raise UnsupportedError(f"target \"{t.key}\" is DoRA: W' = m/‖W + ΔW‖·(W + ΔW) is not W + a low-rank delta, "
                               "so no LoRA holds it; merge it, or write kohya/loratool")
    if not t.dense or t.kind == "full":
        raise UnsupportedError(f"target \"{t.key}\" is {t.kind}, not a LyCORIS kind")
    D = dense_matrix(t, np.float64)  # (out, in·k), float64 so the SVD's own error is far below float32's
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    k = energy_rank(S, energy) if energy is not None else min(int(rank), int(np.sum(S > 0)))
    k = max(k, 1)
    B = (U[:, :k] * S[:k]).astype(np.float32)  # (out, k)
    A = Vh[:k].astype(np.float32)  # (k, in·k)
    total = float(np.sum(S ** 2))
    optimum = math.sqrt(max(float(np.sum(S[k:] ** 2)), 0.0) / total) if total > 0 else 0.0
    err = relative_error(D, B.astype(np.float64) @ A.astype(np.float64))
    out, inp = t.matrix_shape
    block = Block(rank=k, alpha=float(k), scale_rule="standard", rows=(0, out), cols=(0, inp), A=A, B=B)
    info = {k_: v for k_, v in t.info.items() if k_ not in ("lycoris", "lycoris_alpha")}
    new = replace(t, kind="lora", factors={}, delta_scale=1.0, blocks=(block,),
                  info={**info, "converted_from": t.kind, "relative_error": err})
    row = {"target": t.key, "kind": t.kind, "rank_after": k, "relative_error": err, "optimal_error": optimum,
           "energy_retained": float(np.sum(S[:k] ** 2)) / total if total > 0 else 1.0}
    return new, row


def to_lora(adapter, rank: int | None = None, energy: float | None = None):
    """Every LyCORIS target of `adapter` (loha, lokr, tucker) as its optimal LoRA (`to_lora_target`); other
    targets kept. Returns (adapter, one report row per converted target).

    Raises:
        NumericError: rank < 1 or energy outside (0, 1].
        UnsupportedError: as to_lora_target.
    """
    from ..errors import NumericError

    if (rank is None) == (energy is None):
        raise ValueError("to_lora takes exactly one of rank and energy")
    if rank is not None and int(rank) < 1:
        raise NumericError(f"rank {rank} is below 1; pass a rank of at least 1")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise NumericError(f"energy {energy} is outside (0, 1]; pass a fraction such as 0.99")
    targets, rows = [], []
    for t in adapter.as_numpy():
        if t.kind in ("loha", "lokr", "tucker") and not t.is_dora:
            t, row = to_lora_target(t, rank, energy)
            rows.append(row)
        targets.append(t)
    return adapter.replace_targets(targets), rows


__all__ = ["to_lora", "to_lora_target"]
