"""Mixture-of-experts bases: per-expert linears and the fused 3-D expert tensors of transformers 5.

Facts read from transformers 5.24 (models/*/modeling_*.py, conversion_mapping.py, core_model_loading.py):

- Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 (and every family conversion_mapping maps to "qwen2_moe") hold
  `<layer>.mlp.experts.gate_up_proj` (E, 2I, H) and `<layer>.mlp.experts.down_proj` (E, H, I), with no
  `.weight` suffix: each expert's nn.Linear weight (out, in) (`F.linear(x, W[e])`), gate rows [0, I) then up
  rows [I, 2I) (`.chunk(2, dim=-1)`): layout "experts" (adapter.py).
- Loading a per-expert checkpoint stacks the experts (MergeModulelist(dim=0)) and concatenates gate and up
  (Concatenate(dim=1)); `save_pretrained` reverts that by default (save_original_format=True), so most
  checkpoints on disk are per expert: Mixtral `<layer>.block_sparse_moe.experts.N.w1/w3/w2.weight`
  (gate/up/down), the others `<layer>.mlp.experts.N.gate_proj/up_proj/down_proj.weight`.
  `save_pretrained(save_original_format=False)` writes the fused tensors.
- gpt-oss holds `gate_up_proj` (E, H, 2I) and `down_proj` (E, I, H) input-major (`x @ W[e]`,
  `use_experts_implementation(is_transposed=True)`), gate and up interleaved (columns ::2 and 1::2), with
  `*_bias` tensors: layout "experts_t"; it has no per-expert form, so only fused adapters fit it.

`ExpertsView` shows a base under both forms (the per-expert keys of a fused base, the fused keys of a per-expert
base) so that adapter readers resolve either; `fit_experts` then moves the targets on shown keys onto the
tensors the base stores, exactly: expert e's ΔW of a per-expert gate (up) linear is the block at rows
[e·2I, e·2I + I) ([e·2I + I, (e+1)·2I)) of the fused target's matrix view, its down linear rows [e·H, (e+1)·H).
The factors are only sliced or moved, never multiplied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..adapter import Adapter, Block, Target
from ..container import escape
from ..errors import UnsupportedError
from .base import BaseModel

FUSED = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$", re.S)
PER_EXPERT = re.compile(r"^(?P<layer>.+)\.(?:block_sparse_moe\.experts\.(?P<e1>\d+)\.(?P<mix>w1|w3|w2)"
                        r"|mlp\.experts\.(?P<e2>\d+)\.(?P<qwen>gate_proj|up_proj|down_proj))\.weight$", re.S)
MIXTRAL = {"gate": "w1", "up": "w3", "down": "w2"}
QWEN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_PART = {v: k for names in (MIXTRAL, QWEN) for k, v in names.items()}


def per_expert_key(layer: str, e: int, part: str, mixtral: bool) -> str:
    """The per-expert checkpoint key of expert e's `part` ("gate", "up" or "down")."""
    if mixtral:
        return f"{layer}.block_sparse_moe.experts.{e}.{MIXTRAL[part]}.weight"
    return f"{layer}.mlp.experts.{e}.{QWEN[part]}.weight"


def fused_layout(info, module: str) -> str | None:
    """The layout of the fused expert pair `<module>.gate_up_proj` / `<module>.down_proj` of a base (info: key ->
    (shape, dtype) or None): "experts" for (E, 2I, H) / (E, H, I), "experts_t" for gpt-oss's (E, H, 2I) /
    (E, I, H) (told apart by the shapes, or by gpt-oss's `gate_up_proj_bias` when they are square), None when the
    module holds no such pair."""
    gu, dn = info(f"{module}.gate_up_proj"), info(f"{module}.down_proj")
    if gu is None or dn is None or len(gu[0]) != 3 or len(dn[0]) != 3:
        return None
    (_, a, b), (_, c, d) = tuple(gu[0]), tuple(dn[0])
    plain, transposed = a == 2 * d and b == c, b == 2 * c and a == d
    if plain and transposed:
        return "experts_t" if info(f"{module}.gate_up_proj_bias") is not None else "experts"
    return "experts" if plain else "experts_t" if transposed else None


def fused_layouts(reader) -> dict[str, str]:
    """Every fused expert tensor a base stores (`<module>.gate_up_proj` / `down_proj`, 3-D) -> its layout,
    "experts" or "experts_t" (`fused_layout`): what extract needs to factorise each expert as its own matrix."""
    out = {}
    for k in reader.keys():
        m = FUSED.match(k)
        layout = None if m is None else fused_layout(reader.info, k.rsplit(".", 1)[0])
        if layout is not None:
            out[k] = layout
    return out


@dataclass(frozen=True)
class Slot:
    """Rows [row0, row0 + rows) of expert `expert` of a fused tensor, held by the per-expert tensor `per_expert`."""

    fused: str
    expert: int
    row0: int
    rows: int
    per_expert: str


class ExpertsView(BaseModel):
    """A base reader that also shows its experts in the other form: the per-expert keys (both namings) of fused
    "experts" tensors, or the fused keys of complete per-expert sets. Shown keys have shapes and dtypes; a read
    slices or stacks the stored tensors. The reader is not closed by the view."""

    def __init__(self, reader):
        self._r = reader
        self.path, self.files = reader.path, reader.files
        self.slots: dict[str, list[Slot]] = {}  # shown key -> the slots it covers
        self._info: dict[str, tuple] = {}
        keys = list(reader.keys())
        self._fused_base(keys)
        self._per_expert_base(keys)

    def _fused_base(self, keys) -> None:
        for k in keys:
            m = FUSED.match(k)
            if m is None or m["proj"] != "gate_up_proj" or fused_layout(self._r.info, k.rsplit(".", 1)[0]) != "experts":
                continue
            layer, down = m["layer"], k[: -len("gate_up_proj")] + "down_proj"
            (E, two_i, H), dtype = self._r.info(k)
            i = two_i // 2
            for e in range(E):
                for mixtral in (True, False):
                    for part, fused, row0, rows, cols in (("gate", k, 0, i, H), ("up", k, i, i, H),
                                                          ("down", down, 0, H, i)):
                        key = per_expert_key(layer, e, part, mixtral)
                        if self._r.info(key) is None:
                            self.slots[key] = [Slot(fused, e, row0, rows, key)]
                            self._info[key] = ((rows, cols), dtype)

    def _per_expert_base(self, keys) -> None:
        sets: dict[tuple[str, bool], dict[tuple[int, str], str]] = {}
        for k in keys:
            m = PER_EXPERT.match(k)
            if m is not None:
                e = int(m["e1"] if m["e1"] is not None else m["e2"])
                sets.setdefault((m["layer"], m["mix"] is not None), {})[(e, _PART[m["mix"] or m["qwen"]])] = k
        for (layer, mixtral), have in sets.items():
            E = 1 + max(e for e, _ in have)
            parts = [(e, p) for e in range(E) for p in ("gate", "up", "down")]
            if any(ep not in have for ep in parts):
                continue  # an incomplete set is not a fused tensor transformers would build
            gate, dtype = self._r.info(have[(0, "gate")])
            i, h = gate
            if any(tuple(self._r.info(have[(e, p)])[0]) != ((h, i) if p == "down" else (i, h)) for e, p in parts):
                continue
            gu, dn = f"{layer}.mlp.experts.gate_up_proj", f"{layer}.mlp.experts.down_proj"
            if self._r.info(gu) is not None or self._r.info(dn) is not None:
                continue
            self.slots[gu] = [Slot(gu, e, row0, i, have[(e, p)]) for e in range(E)
                              for p, row0 in (("gate", 0), ("up", i))]
            self.slots[dn] = [Slot(dn, e, 0, h, have[(e, "down")]) for e in range(E)]
            self._info[gu], self._info[dn] = ((E, 2 * i, h), dtype), ((E, h, i), dtype)

    def keys(self):
        return [*self._r.keys(), *self._info]

    def info(self, key):
        return self._info.get(key) or self._r.info(key)

    def read(self, key):
        import numpy as np

        if key not in self.slots:
            return self._r.read(key)
        slots = self.slots[key]
        if len(slots) == 1 and slots[0].per_expert == key:  # a per-expert key shown on a fused base
            s = slots[0]
            return np.ascontiguousarray(self._r.read(s.fused)[s.expert, s.row0:s.row0 + s.rows])
        shape, _ = self._info[key]
        out = None
        for s in slots:  # a fused key shown on a per-expert base
            W = self._r.read(s.per_expert)
            out = np.empty(shape, W.dtype) if out is None else out
            out[s.expert, s.row0:s.row0 + s.rows] = W
        return out

    def mapped(self, key, start: int = 0, stop: int | None = None):
        return self._r.mapped(key, start, stop)

    def sha256(self, key):
        return self._r.sha256(key)

    def check_unchanged(self) -> None:
        self._r.check_unchanged()


def experts_view(reader):
    """`reader`, or an ExpertsView of it when it holds experts in either form."""
    view = ExpertsView(reader)
    return view if view.slots else reader


def fit_experts(adapter: Adapter, view) -> Adapter:
    """The adapter with every target on a key `view` only shows moved onto the tensors the base stores: targets
    on per-expert linears become blocks of the fused target, a fused target is cut into per-expert targets.

    Deferred targets (Target.load) stay deferred: each moved target reads its sources when it is loaded.

    Args:
        view: an ExpertsView (anything else returns the adapter unchanged).
    Raises:
        UnsupportedError: a whole-tensor (full) target on a shown key, a fused block that spans two experts, or
            a fused "experts_t" target on a per-expert base.
    """
    slots = getattr(view, "slots", None)
    moved = [t for t in adapter if slots and t.key in slots]
    if not moved:
        return adapter
    for t in moved:
        if t.kind != "lora" or t.layout not in ("linear", "experts"):
            raise UnsupportedError(f"target \"{escape(t.key)}\" ({t.kind}, layout {t.layout}) is on an expert tensor "
                                   "the base stores in the other form; only LoRA blocks on the experts' linears move "
                                   "between per-expert and fused tensors")
    sources: dict[str, list[Target]] = {}
    for t in moved:
        for key in _homes(t, slots):
            sources.setdefault(key, []).append(t)
    kept = {k: t for k, t in adapter.targets.items() if k not in {m.key for m in moved}}
    for key, srcs in sources.items():
        if key in kept:  # the adapter also targets the stored tensor itself: its blocks add
            srcs = [kept.pop(key), *srcs]
        made = _moved(key, srcs, view, slots)
        if any(s.load is not None for s in srcs):
            made = replace(made, load=lambda _t, key=key, srcs=srcs: _moved(key, [s.loaded() for s in srcs], view,
                                                                              slots))
        kept[key] = made
    return adapter.replace_targets(kept.values())


def _homes(t: Target, slots) -> list[str]:
    """The stored keys a target on a shown key lands on."""
    ss = slots[t.key]
    return [ss[0].fused] if ss[0].per_expert == t.key else sorted({s.per_expert for s in ss})


def _moved(key: str, srcs: list[Target], view, slots) -> Target:
    """The target on stored key `key` made of the blocks `srcs` (targets on `key` itself or on shown keys) put
    there; factors may be arrays, Lazy, or None (a structure)."""
    shape, dtype = view.info(key)
    shape = tuple(shape)
    blocks = []
    for t in srcs:
        if t.key == key:
            blocks.extend(t.blocks)
        elif slots[t.key][0].per_expert == t.key:  # per-expert linear -> rows of the fused "experts" view
            s = slots[t.key][0]
            off = s.expert * shape[1] + s.row0
            blocks.extend(replace(b, rows=(b.rows[0] + off, b.rows[1] + off)) for b in t.blocks)
        else:
            blocks.extend(_cut(t, key, slots[t.key]))
    first = srcs[0]
    layout = "experts" if len(shape) == 3 else "linear"
    info = dict(first.info)
    # the fit report names where a moved target came from ("per_expert" or "fused")
    info["moved_from"] = "per_expert" if len(shape) == 3 else "fused"
    info["moved_keys"] = sorted({t.key for t in srcs if t.key != key})
    return Target(key=key, layout=layout, shape=shape, blocks=tuple(blocks), dtype=first.dtype if first.key == key
                  else None, info=info)


def _cut(t: Target, key: str, ss: list[Slot]) -> list[Block]:
    """The parts of a fused target's blocks that fall on per-expert tensor `key`: rows of one expert's slot,
    with the matching rows of B (exact: A is shared)."""
    d1 = t.shape[1]
    out = []
    for b in t.blocks:
        e = b.rows[0] // d1
        if b.rows[1] > (e + 1) * d1:
            raise UnsupportedError(f"target \"{escape(t.key)}\": a block spans rows {b.rows[0]}:{b.rows[1]}, across "
                                   "experts; per-expert linears cannot hold it")
        for s in ss:
            if s.per_expert != key or s.expert != e:
                continue
            lo, hi = max(b.rows[0], e * d1 + s.row0), min(b.rows[1], e * d1 + s.row0 + s.rows)
            if lo >= hi:
                continue
            base = e * d1 + s.row0
            B = None if b.B is None else _rows(b.B, lo - b.rows[0], hi - b.rows[0])
            out.append(replace(b, rows=(lo - base, hi - base), B=B))
    return out


def _rows(B, a: int, b: int):
    from ._common import Lazy

    if isinstance(B, Lazy):
        return Lazy(B.names, lambda arrays, make=B.make: make(arrays)[a:b])
    return B[a:b]


__all__ = ["ExpertsView", "experts_view", "fit_experts", "fused_layout", "fused_layouts", "per_expert_key", "Slot",
           "FUSED", "PER_EXPERT"]
