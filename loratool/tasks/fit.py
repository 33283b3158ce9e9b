"""The fit report of `loratool validate --base`: for every target of an adapter, what it changes in the base.

Per target: the adapter's own name for it (PEFT module, kohya name, loralib module, native key), the base key
it resolves to, its shape against the base tensor's, the base tensor's dtype, the effective scale of each block
(rank_pattern, alpha_pattern and rsLoRA applied: `Block.scale`, as the readers compute it), the layout, the
blocks (the target index), and whether the base ties the tensor to another (tie_word_embeddings), in which case
changing one changes both. Modules that do not fit are all listed, with the rule they break.
"""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter
from ..container import Finding, escape

def ties_of(base, wanted=()) -> list:
    """The tied tensors of an open base (io.ties.find_ties: its config.json, shared storage, or a head it lacks
    that an adapter targets)."""
    from ..io.ties import HeadsView, find_ties

    if isinstance(base, HeadsView):  # the view shows the missing head: its ties were found on the file itself
        return base.ties
    return find_ties(base, Path(base.path), wanted)


def _tied_note(key: str, ties) -> tuple[str, str] | None:
    """(the other key of the tie `key` is in, how the tie was found), or None."""
    for t in ties:
        if key == t.embed:
            return t.head + ("" if t.head_stored else " (not stored: the embedding's tensor)"), t.how
        if key == t.head:
            return t.embed, t.how
    return None


def report(adapter: Adapter | None, base, *, names: dict | None = None, refused=(), changed: set | None = None,
           scale_known: bool = True) -> tuple[dict, list[Finding]]:
    """The fit report of an adapter whose target keys are already the base's, and its findings.

    Args:
        adapter: the adapter's structure with keys resolved against `base` (None when it could not be read).
        base: an open io.base.BaseModel.
        names: base key -> the adapter's own name for the target (default: the key).
        refused: Findings of the modules the reader refused against this base (B001, B002, B003, F002): listed,
            all of them, under "unfit"; the names of those that match no base key (B001) also under "unmatched".
        changed: keys of the targets whose delta is not all zero, when the tensors were read (None: not read).
        scale_known: False when the scale depends on an option that was not given (loralib's alpha).
    Returns:
        (the report as a JSON-ready dict, findings: B001-B003 and W005 on the targets (validation.check_base),
        F001 when the adapter changes nothing, F003 for each target on a tied tensor).
    """
    from ..validation import check_base

    names = names or {}
    findings: list[Finding] = []
    targets = list(adapter) if adapter is not None else []
    if adapter is not None:
        findings += check_base(adapter, base)
    bad = {f.target for f in findings if f.severity == "error"}
    ties = ties_of(base, [t.key for t in targets])
    rows = []
    for t in targets:
        got = base.info(t.key)
        shape, dtype = (tuple(got[0]), got[1]) if got is not None else (None, None)
        tied = _tied_note(t.key, ties)
        note = None if tied is None else tied[0]
        if tied is not None and escape(t.key) not in bad:
            findings.append(Finding("F003", f"target \"{escape(t.key)}\": the base ties it to \"{escape(tied[0])}\" "
                                            f"({tied[1]}); a merge into the one tensor (PEFT's merge_and_unload) "
                                            "changes both sides, while the adapter run unmerged changes this one: "
                                            "`loratool merge` unties them (--keep-tied moves both)", escape(t.key)))
        blocks = [{"rows": list(b.rows), "cols": list(b.cols), "rank": b.rank, "alpha": b.alpha,
                   "scale_rule": b.scale_rule, "scale": b.scale if scale_known else None} for b in t.blocks]
        rows.append({
            "name": names.get(t.key, t.key), "base_key": t.key if got is not None else None, "kind": t.kind,
            "layout": t.layout, "shape": list(t.shape), "base_shape": None if shape is None else list(shape),
            "agrees": shape == tuple(t.shape), "base_dtype": dtype, "rank": t.rank,
            # the scheme of a quantized base weight (ops.quant), fitted dequantized; None for a float tensor
            "quantized": getattr(base, "scheme", lambda key: None)(t.key),
            "scales": sorted({b["scale"] for b in blocks}, key=lambda s: (s is None, s)) if blocks else
            [t.delta_scale], "blocks": blocks, "whole": t.kind == "full" or t.is_whole,
            "tied_with": note, "changes": None if changed is None else t.key in changed,
            "moved_from": t.info.get("moved_from"),
            "ok": escape(t.key) not in bad})
    unfit = [{"name": f.target, "rule": f.rule, "message": f.message} for f in refused]
    unfit += [{"name": r["name"], "rule": f.rule, "message": f.message} for r in rows for f in findings
              if f.severity == "error" and f.target == escape(r["base_key"] or r["name"])]
    fitting = [r for r in rows if r["ok"]]
    changing = [r for r in fitting if r["changes"] is not False]
    if adapter is not None and not targets and not refused:
        findings.append(Finding("F001", "the adapter has no targets, so it changes nothing in the base"))
    elif fitting and not changing:
        findings.append(Finding("F001", f"every one of the {len(fitting)} targets that fit the base has an all-zero "
                                        "delta (B = 0, as PEFT initialises it), so the adapter changes nothing"))
    doc = {
        "base": str(base.path),
        "tied": [{"embed": t.embed, "head": t.head, "head_stored": t.head_stored, "how": t.how} for t in ties],
        "targets": len(rows) + len({f.target for f in refused if f.target is not None}), "fit": len(fitting),
        "changes_base": bool(changing),
        "rows": rows,
        "unfit": unfit,
        "unmatched": sorted({u["name"] for u in unfit if u["rule"] == "B001" and u["name"] is not None}),
        "experts": _experts(rows, base),
    }
    return doc, findings


def experts_fitted(adapter: Adapter | None, base, changed: set | None = None):
    """(the adapter with its targets on expert tensors the base (an io.experts view) only shows moved onto the
    ones it stores (io.experts.fit_experts), as merge applies them; `changed` with the keys they moved to)."""
    from ..io.experts import fit_experts

    if adapter is None:
        return None, changed
    fitted = fit_experts(adapter, base)
    if changed is not None and fitted is not adapter:
        changed = changed | {t.key for t in fitted if set(t.info.get("moved_keys", ())) & changed}
    return fitted, changed


def _experts(rows: list[dict], base) -> dict | None:
    """Which expert layouts the fit found: the base's (fused "experts", gpt-oss "experts_t", per-expert) and the
    adapter's targets on them, and how many were moved between the forms."""
    from ..io.experts import FUSED, PER_EXPERT, fused_layout

    keys = list(base.keys())
    shown = getattr(base, "slots", {})
    stored = [k for k in keys if k not in shown]
    fused = sorted({fused_layout(base.info, k.rsplit(".", 1)[0]) for k in stored if FUSED.match(k)} - {None})
    per = any(PER_EXPERT.match(k) for k in stored)
    if not fused and not per:
        return None
    layouts: dict[str, int] = {}
    for r in rows:
        lay = r["layout"] if r["layout"] in ("experts", "experts_t") else \
            "per_expert" if r["base_key"] and PER_EXPERT.match(r["base_key"]) else None
        if lay:
            layouts[lay] = layouts.get(lay, 0) + 1
    return {"base": fused + (["per_expert"] if per else []), "targets": layouts,
            "moved": sum(1 for r in rows if r.get("moved_from"))}


def own_names(resolved: Adapter, own: Adapter | None) -> dict[str, str]:
    """base key -> the adapter's own name for each resolved target: kohya's name from its info, else the key
    read without a base that the base key equals or extends by a leading prefix (BaseKeys.resolve_dotted)."""
    names = {}
    own_keys = list(own.targets) if own is not None else []
    for t in resolved:
        kohya = t.info.get("kohya_name")
        if isinstance(kohya, str):
            names[t.key] = kohya
            continue
        hits = [k for k in own_keys if k == t.key or t.key.endswith("." + k) or k.endswith("." + t.key)]
        names[t.key] = hits[0].removesuffix(".weight") if len(hits) == 1 else t.key
    return names


__all__ = ["report", "own_names", "ties_of"]
