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

# Module names of input embeddings and output heads that transformers ties with tie_word_embeddings.
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
HEADS = ("lm_head", "embed_out", "output")


def tied_pair(base) -> tuple[list[str], list[str]] | None:
    """(input embedding keys, output head keys) of a base whose config ties them, else None.

    The config is the base folder's `config.json` (for a file, the one beside it): `tie_word_embeddings` true,
    or absent (transformers' default is true) while the base stores no output head, which is what
    `save_pretrained` writes for a tied model.
    """
    from ..container import read_json_file
    from ..errors import LoraToolError

    path = Path(base.path)
    folder = path if path.is_dir() else path.parent
    try:
        cfg = read_json_file(folder / "config.json", "config.json")
    except LoraToolError:
        return None
    keys = list(base.keys())
    embeds = [k for k in keys if _module_name(k) in EMBEDDINGS]
    heads = [k for k in keys if _module_name(k) in HEADS]
    tie = cfg.get("tie_word_embeddings") if isinstance(cfg, dict) else None
    if tie is True or (tie is None and isinstance(cfg, dict) and embeds and not heads):
        return embeds, heads
    return None


def _module_name(key: str) -> str:
    """"model.embed_tokens.weight" -> "embed_tokens": the module's own name of a parameter key."""
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def _tied_note(key: str, tied) -> str | None:
    if tied is None or _module_name(key) not in EMBEDDINGS + HEADS:
        return None
    embeds, heads = tied
    if _module_name(key) in EMBEDDINGS:
        other = ", ".join(f"\"{escape(k)}\"" for k in heads) or "the output head (lm_head, not stored: tied)"
    else:
        other = ", ".join(f"\"{escape(k)}\"" for k in embeds) or "the input embeddings"
    return other


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
    tied = tied_pair(base)
    rows = []
    for t in targets:
        got = base.info(t.key)
        shape, dtype = (tuple(got[0]), got[1]) if got is not None else (None, None)
        note = _tied_note(t.key, tied)
        if note is not None and escape(t.key) not in bad:
            findings.append(Finding("F003", f"target \"{escape(t.key)}\": the base ties its input embeddings and "
                                            f"output head (tie_word_embeddings), so changing it changes {note} too",
                                    escape(t.key)))
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
        "tied": None if tied is None else {"embeddings": tied[0], "heads": tied[1]},
        "targets": len(rows) + len({f.target for f in refused if f.target is not None}), "fit": len(fitting),
        "changes_base": bool(changing),
        "rows": rows,
        "unfit": unfit,
        "unmatched": sorted({u["name"] for u in unfit if u["rule"] == "B001" and u["name"] is not None}),
    }
    return doc, findings


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


__all__ = ["report", "own_names", "tied_pair", "EMBEDDINGS", "HEADS"]
