"""Rescale an adapter: change its strength exactly (scale, alpha) or its rank optimally (rank, energy).

Strength changes never touch a factor: they multiply every block's alpha (and every full target's scale),
which is exact for both scale rules because alpha/r and alpha/sqrt(r) are linear in alpha.

Rank changes are the Eckart-Young truncation of each target's delta, computed from the factors with a QR
of B and of A^T and an SVD of the small core (ops/linalg.factored_svd): never an out x in matrix. See
ops/factored.py for how target-index blocks are grouped and which alpha the new blocks get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..adapter import Adapter
from ..container import escape
from ..errors import NumericError, UnsupportedError
from .factored import truncate_target

OPERATIONS = ("scale", "alpha", "rank", "energy")


@dataclass
class RescaleResult:
    """The new adapter and what the CLI reports about it (plain data, ready for a table or JSON).

    `rows` has one dict per target: for scale and alpha its scales before and after (scale_before,
    scale_after, one per block); for rank and energy rank_before, rank_after, blocks_before, blocks_after,
    energy_retained and relative_error (= ||ΔW - ΔW'||_F / ||ΔW||_F).
    """

    adapter: Adapter
    rows: list[dict] = field(default_factory=list)
    scale: float | None = None  # the strength factor applied, for scale and alpha
    operation: str | None = None  # one of OPERATIONS
    value: float | int | None = None  # the value asked for
    parameters_before: int | None = None  # the input's parameter count
    output: str | None = None  # where loratool.rescale wrote the adapter, if it did
    to: str | None = None  # the dialect it was written in
    bytes: int = 0  # bytes written

    def report(self) -> dict:
        """Operation, value, strength factor, parameter counts before and after, and the per-target rows."""
        return {"output": self.output, "to": self.to, "bytes": self.bytes,
                "operation": self.operation, "value": self.value, "strength_factor": self.scale,
                "parameters_before": self.parameters_before, "parameters_after": self.adapter.n_params,
                "targets": self.rows}


def _finite(name: str, x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise NumericError(f"{name} {x} is not a finite number; pass a finite value")
    return x


def scale_adapter(adapter: Adapter, s: float) -> Adapter:
    """ΔW' = s · ΔW for every target: alpha *= s on every block, scale *= s on every full target.

    Factors are not touched (torch tensors are handed back as numpy arrays over the same memory).

    Raises:
        NumericError: s, or an alpha or scale it produces, is not finite.
    """
    s = _finite("scale", s)
    targets = []
    _refuse_dora(adapter)
    for t in adapter.as_numpy():
        if t.dense:  # full, and the LyCORIS kinds: ΔW = delta_scale · f(factors)
            nt = replace(t, delta_scale=t.delta_scale * s)
            if not math.isfinite(nt.delta_scale):
                raise NumericError(f"target \"{escape(t.key)}\": scale {t.delta_scale} x {s} overflows; "
                                   "use a smaller factor")
        else:
            blocks = [replace(b, alpha=b.alpha * s) for b in t.blocks]
            for b in blocks:
                if not math.isfinite(b.alpha):
                    raise NumericError(f"target \"{escape(t.key)}\": alpha x {s} overflows; use a smaller factor")
            nt = t.with_blocks(blocks)
        targets.append(nt)
    return adapter.replace_targets(targets)


def _refuse_dora(adapter: Adapter) -> None:
    """DoRA's W' = m/‖W + ΔW‖·(W + ΔW) does not scale with ΔW: no alpha or rank change has an exact meaning."""
    for t in adapter:
        if t.is_dora:
            raise UnsupportedError(f"target \"{escape(t.key)}\" is DoRA, whose merge W' = m/‖W + ΔW‖·(W + ΔW) is not "
                                   "linear in ΔW, so scaling or truncating ΔW does not scale the change; rescale the "
                                   "adapter's other targets (--exclude), or merge it as it is")


def uniform_alpha(adapter: Adapter) -> float:
    """The one alpha shared by every block of the adapter.

    Raises:
        UnsupportedError: the adapter has no blocks, or blocks with different alphas (both named).
    """
    seen: dict[float, str] = {}
    for t in adapter:
        for b in t.blocks:
            seen.setdefault(b.alpha, t.key)
    if not seen:
        raise UnsupportedError("adapter has no low-rank blocks, so it has no alpha to set; use a scale factor "
                               "instead (rescale --scale)")
    if len(seen) > 1:
        (a1, k1), (a2, k2) = list(seen.items())[:2]
        raise UnsupportedError(f"blocks have different alphas ({a1:g} on target \"{escape(k1)}\", {a2:g} on target "
                               f"\"{escape(k2)}\"), so no single alpha can be set; use a scale factor instead "
                               "(rescale --scale)")
    return next(iter(seen))


def set_alpha(adapter: Adapter, alpha: float) -> tuple[Adapter, float]:
    """Give every block the alpha `alpha`; exactly `scale_adapter(adapter, alpha / old_alpha)`.

    Full targets are scaled by the same factor, so the whole ΔW scales uniformly.

    Returns:
        The new adapter and the strength factor alpha / old_alpha.
    Raises:
        UnsupportedError: blocks have different alphas (see uniform_alpha).
        NumericError: alpha is not finite, or the old alpha is 0 (no factor reaches the new one).
    """
    alpha = _finite("alpha", alpha)
    old = uniform_alpha(adapter)
    if old == 0.0:
        raise NumericError("every block has alpha 0, so its delta is zero and no new alpha changes that")
    s = alpha / old
    out = scale_adapter(adapter, s)
    # Set the alpha itself rather than old * (alpha / old), so the file shows exactly the value asked for.
    targets = [t.with_blocks([replace(b, alpha=alpha) for b in t.blocks]) if not t.dense else t for t in out]
    return out.replace_targets(targets), s


def resize(adapter: Adapter, rank: int | None = None, energy: float | None = None, progress=None) -> RescaleResult:
    """Optimal low-rank truncation of every lora target, from the factors (strength kept).

    Args:
        adapter: an adapter with its factors loaded.
        rank: keep at most `rank` singular values per block group; or
        energy: keep the fewest that retain this fraction (0 < energy <= 1) of each group's ||ΔM||_F^2.
        progress: optional callable progress(advance, total=None): once with total= the number of targets,
            then once per target.
    Returns:
        RescaleResult whose rows give rank_before, rank_after, energy_retained and relative_error
        (= ||ΔW - ΔW'||_F / ||ΔW||_F) per target; full targets are kept as they are (energy 1).
        Each truncated target records energy_retained and rank_before in Target.info.
    Raises:
        NumericError: rank < 1, energy outside (0, 1], or a truncated factor overflows its dtype.
    """
    if (rank is None) == (energy is None):
        raise ValueError("resize takes exactly one of rank and energy")
    if rank is not None and int(rank) < 1:
        raise NumericError(f"rank {rank} is below 1; pass a rank of at least 1")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise NumericError(f"energy {energy} is outside (0, 1]; pass a fraction such as 0.99")
    adapter = adapter.as_numpy()
    _refuse_dora(adapter)
    if progress is not None:
        progress(0, total=len(adapter))
    targets, rows = [], []
    for t in adapter:
        if t.dense:  # kept: a LyCORIS kind becomes LoRA by `convert --rank` (ops.to_lora)
            targets.append(t)
            rows.append({"target": t.key, "kind": t.kind, "rank_before": None, "rank_after": None,
                         "blocks_before": 0, "blocks_after": 0, "energy_retained": 1.0, "relative_error": 0.0})
        else:
            nt, row = truncate_target(t, rank=rank, energy=energy)
            targets.append(nt)
            rows.append(row)
        if progress is not None:
            progress(1)
    op = {"rank": int(rank)} if rank is not None else {"energy": float(energy)}
    new = replace(adapter.replace_targets(targets), info={**dict(adapter.info), "rescale": op})
    (name, value), = op.items()
    return RescaleResult(new, rows, operation=name, value=value, parameters_before=adapter.n_params)


def rescale(adapter: Adapter, *, scale: float | None = None, alpha: float | None = None, rank: int | None = None,
            energy: float | None = None, progress=None) -> RescaleResult:
    """One entry point for the four kinds of rescale of an in-memory adapter; exactly one keyword must be given.

    Args:
        adapter: an adapter with its factors loaded (numpy arrays or torch tensors).
        scale: ΔW' = scale · ΔW exactly (alphas and full-target scales change, factors do not).
        alpha: every block's alpha set to `alpha` (see set_alpha).
        rank, energy: the optimal truncation of each block group (see resize).
        progress: optional callable progress(advance, total=None): once with total= the number of targets,
            then once per target.
    Returns:
        RescaleResult with factors as numpy arrays. For scale and alpha, `rows` lists each target's old and
        new scales and `scale` is the strength factor.
    Raises:
        ValueError: not exactly one of scale, alpha, rank, energy was given.
        NumericError, UnsupportedError: as scale_adapter, set_alpha and resize say.
    """
    given = [k for k, v in (("scale", scale), ("alpha", alpha), ("rank", rank), ("energy", energy)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"rescale takes exactly one of scale, alpha, rank, energy (got {', '.join(given) or 'none'})")
    if rank is not None or energy is not None:
        return resize(adapter, rank=rank, energy=energy, progress=progress)
    adapter = adapter.as_numpy()
    if scale is not None:
        new, s = scale_adapter(adapter, scale), float(scale)
        op = {"scale": s}
    else:
        new, s = set_alpha(adapter, alpha)
        op = {"alpha": float(alpha)}
    new = replace(new, info={**dict(adapter.info), "rescale": op})
    if progress is not None:
        progress(0, total=len(adapter))
    rows = []
    for t_old, t_new in zip(adapter, new):
        if progress is not None:
            progress(1)
        if t_old.dense:
            rows.append({"target": t_old.key, "kind": t_old.kind, "scale_before": [t_old.delta_scale],
                         "scale_after": [t_new.delta_scale]})
        else:
            rows.append({"target": t_old.key, "kind": t_old.kind, "scale_before": [b.scale for b in t_old.blocks],
                         "scale_after": [b.scale for b in t_new.blocks]})
    (name, value), = op.items()
    return RescaleResult(new, rows, scale=s, operation=name, value=value, parameters_before=adapter.n_params)


__all__ = ["OPERATIONS", "RescaleResult", "rescale", "resize", "scale_adapter", "set_alpha", "uniform_alpha"]
