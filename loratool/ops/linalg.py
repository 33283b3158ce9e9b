"""Shared linear algebra on adapters, all in float32 and all in factored form unless a caller asks for
the dense matrix. Shapes are written where they arise; M is a target's (out, in) matrix view.
"""

from __future__ import annotations

import math

import torch

from ..adapter import Block, Target
from ..hostarray import as_torch


def f32(x: torch.Tensor, device=None) -> torch.Tensor:
    """Float32 copy (or view) on `device` (default: where it is); a HostTensor (numpy) is converted."""
    x = as_torch(x)
    return x.to(device=device if device is not None else x.device, dtype=torch.float32)


def stacked_factors(t: Target, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the target's delta as one product ΔM = Bs @ As, scales folded into Bs.

    Each block's factors are zero-padded to the whole matrix view, so overlapping blocks sum correctly.

    Returns:
        Bs (out, R) float32 and As (R, in) float32 with R = sum of block ranks.
    """
    out, inp = t.matrix_shape
    return rect_factors(t.blocks, ((0, out), (0, inp)), device)


def rect_factors(blocks, rect, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the blocks' summed delta on the rectangle `rect` = ((r0, r1), (c0, c1)) of the matrix view as
    one product Bs @ As (float32, scales folded into Bs; every block must lie inside `rect`).

    Returns:
        Bs (h, R) and As (R, w) with h, w the rectangle's size and R the sum of the blocks' ranks.
    """
    (r0, r1), (c0, c1) = rect
    R = sum(b.rank for b in blocks)
    Bs = torch.zeros(r1 - r0, R, dtype=torch.float32, device=device)
    As = torch.zeros(R, c1 - c0, dtype=torch.float32, device=device)
    k = 0
    for b in blocks:
        Bs[b.rows[0] - r0:b.rows[1] - r0, k:k + b.rank] = f32(b.B, device) * b.scale  # (rows, r)
        As[k:k + b.rank, b.cols[0] - c0:b.cols[1] - c0] = f32(b.A, device)  # (r, cols)
        k += b.rank
    return Bs, As


def block_delta(b: Block, device=None) -> torch.Tensor:
    """scale * B @ A in float32: (rows, r) @ (r, cols) -> (rows, cols)."""
    return (f32(b.B, device) @ f32(b.A, device)) * b.scale


def delta_matrix(t: Target, device=None) -> torch.Tensor:
    """The dense (out, in) float32 delta of a lora target's matrix view. Materialises out x in."""
    out, inp = t.matrix_shape
    M = torch.zeros(out, inp, dtype=torch.float32, device=device)
    for b in t.blocks:
        M[b.rows[0]:b.rows[1], b.cols[0]:b.cols[1]] += block_delta(b, device)
    return M


def to_base_layout(t: Target, M: torch.Tensor) -> torch.Tensor:
    """Map a matrix-view delta (out, in) to the base tensor's own shape and orientation."""
    if t.layout in ("fan_in_fan_out", "embedding"):
        return M.T  # (in, out): GPT-2 Conv1D stores W transposed; PEFT embeddings use (B @ A)^T
    if t.layout == "conv":
        return M.reshape(t.shape)
    return M


def from_base_layout(t: Target, W: torch.Tensor) -> torch.Tensor:
    """Inverse of to_base_layout: the (out, in) matrix view of a tensor in the base's shape."""
    if t.layout in ("fan_in_fan_out", "embedding"):
        return W.T
    if t.layout == "conv":
        return W.reshape(t.matrix_shape)
    return W


def delta_tensor(t: Target, device=None) -> torch.Tensor:
    """The dense float32 delta in the base tensor's shape, for any target kind."""
    if t.kind == "full":
        return f32(t.delta, device) * t.delta_scale
    return to_base_layout(t, delta_matrix(t, device))


def factored_svd(B: torch.Tensor, A: torch.Tensor):
    """SVD of the product B @ A without forming it (FORMATS.md, "Known algebra").

    Args:
        B: (m, R) float32. A: (R, n) float32.
    Returns:
        U (m, k), S (k,), Vh (k, n) with k = min(R, m, n) and B @ A = U diag(S) Vh, S descending.
    Cost O((m + n) R^2) instead of O(m n min(m, n)).
    """
    Qb, Rb = torch.linalg.qr(B)  # (m, k1), (k1, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (n, k2), (k2, R)
    core = Rb @ Ra.T  # (k1, R) @ (R, k2) -> (k1, k2)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Vhc @ Qa.T  # (m, k), (k,), (k, n)


def singular_values(t: Target) -> torch.Tensor:
    """Singular values of the target's delta (descending, float32), from the factors for lora targets."""
    if t.kind == "full":
        D = f32(t.delta) * t.delta_scale
        if D.ndim < 2:
            return D.abs().reshape(-1).sort(descending=True).values
        return torch.linalg.svdvals(D.reshape(D.shape[0], -1))
    Bs, As = stacked_factors(t)
    return factored_svd(Bs, As)[1]


def frobenius_norm(t: Target) -> float:
    """||ΔW||_F exactly, from the factors: ||Bs As||_F^2 = trace((Bs^T Bs)(As As^T)), never out x in."""
    if t.kind == "full":
        return float(torch.linalg.vector_norm(f32(t.delta)) * abs(t.delta_scale))
    Bs, As = stacked_factors(t)
    G = (Bs.T @ Bs) * (As @ As.T)  # (R, R) elementwise product; its sum is the trace of the product
    return math.sqrt(max(float(G.sum()), 0.0))


def energy_rank(S: torch.Tensor, fraction: float) -> int:
    """Smallest k with sum(S[:k]^2) >= fraction * sum(S^2) (0 for a zero delta)."""
    e = S.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype) - 1e-12).item()) + 1
    return min(k, S.numel())
