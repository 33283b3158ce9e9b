"""`loratool.inspect`: what an adapter is, from its headers and configs (its factors only with stats)."""

from __future__ import annotations

from collections import Counter

from ..adapter import Adapter
from ..fsutil import maps_os_errors


@maps_os_errors("path", writes=False)
def inspect(path, *, stats: bool = False, dialect: str | None = None, revision: str | None = None,
            **options) -> dict:
    """A summary of whatever `path` is, from its structure: for a native file, a PEFT folder with
    adapter_model.safetensors or a kohya file, the headers and configs alone (no tensor data, no torch).

    What a reader would refuse for want of a config or an option is described instead: a loralib file without
    --alpha or a PEFT weights file without its adapter_config.json gives its ranks with alpha unknown
    ("alpha_unknown" says what is missing); PEFT's saved whole tensors (modules_to_save, saved embeddings) are
    listed as "replacements" without --base. A model (a Hugging Face or diffusers folder, a .safetensors file
    with no LoRA keys, a shard) is described as one (tasks.model_info.describe_model).

    Args:
        path: an adapter file or a PEFT folder, a PEFT adapter's Hugging Face Hub id (`org/name[@REV]`), or a
            model folder or file.
        stats: also read the factors and add per target "stats": ||ΔW||_F, the ranks keeping 90% and 99% of
            the energy, and the count of non-finite values (counted, not refused). It needs every alpha.
        dialect: force a dialect instead of detecting it (the path is then read as an adapter).
        revision: the Hub revision of a Hub id given without its own `@REV` (path or base).
        options: reader options (base (a path or Hub id), allow_unknown, allow_partial, alpha, r, enable_lora,
            fan_in_fan_out); one that is set and that the dialect does not take is refused.
    Returns:
        For an adapter, a dict: kind "adapter", path, dialect, format and spec_version (of a native file, else
        None), unknown_keys (foreign dialects), alpha_unknown (why, or None), the fields of `summary` (dtypes and
        bytes when the tensors sit in a safetensors file), "replacements" ([{key, tensor, shape, dtype}]),
        "guess" (guess.guess), "training" (guess.training), and a "stats" entry in every per_target row when
        asked. For a model, describe_model's dict (kind "model").
    Raises:
        SpecError, FileError, MismatchError, UnsupportedError: as the dialect's reader says.
        UsageError: `path` is a model and `stats` or a reader option is set.
    """
    from .. import spec
    from ..guess import guess, training
    from ..io import registry
    from ._inputs import hub_inputs

    base, (local,) = hub_inputs(options.get("base"), [path], revision)
    if base is not None:
        options["base"] = base
    src = registry.Source(local)
    if dialect is None and _is_model(src):
        from ..errors import UsageError
        from .model_info import describe_model

        given = (["--stats"] if stats else []) + ["--" + k.replace("_", "-") for k, v in options.items()
                                                  if v not in (None, False, (), [])]
        if given:  # an option is never silently ignored
            raise UsageError(f"{path}: is a model, not an adapter; {', '.join(given)} describe(s) adapters: drop it")
        return describe_model(local)
    d = registry.get(dialect) if dialect else registry.detect(src)
    if stats:  # a native reader refuses non-finite factors unless told to leave them to be counted
        adapter = registry.load(src, dialect=d, **options, check=False)
    else:
        adapter = registry.structure(src, dialect=d, partial=True, **options)
    hdr = src.tensor_header
    meta = dict(hdr.metadata) if hdr is not None else {}
    fmt = meta.get(spec.KEY_FORMAT)
    doc = {"kind": "adapter", "path": str(path), "dialect": d.name, "format": fmt,
           "spec_version": meta.get(spec.KEY_VERSION) if fmt is not None else None}
    if fmt is None:
        doc["unknown_keys"] = list(adapter.info.get("unknown_keys", []))
    doc["alpha_unknown"] = adapter.info.get("alpha_unknown")
    replaced = [t for t in adapter if t.kind == "full" and "saved_as" in t.info]
    gone = {t.key for t in replaced}
    kept = adapter.replace_targets(t for t in adapter if t.key not in gone)
    doc.update(summary(kept, hdr))
    doc["replacements"] = [{"key": t.key, "tensor": t.info["saved_as"], "shape": list(t.shape),
                            "dtype": t.info.get("saved_dtype")} for t in replaced]
    for name in adapter.info.get("saved_beside_lora", []):  # a PEFT embedding's saved base layer
        x = hdr.tensors.get(name) if hdr is not None else None
        doc["replacements"].append({"key": None, "tensor": name, "shape": list(x.shape) if x else None,
                                    "dtype": x.dtype if x else None, "beside_lora": True})
    peft_config = _peft_config(src.path) if d.name == "peft" else None
    doc["training"] = training(meta, peft_config)
    declared = {**meta, **{k: v for k, v in (peft_config or {}).items() if k == "base_model_name_or_path"}}
    doc["guess"] = guess({t.key: (t.shape if t.kind == "full" else t.matrix_shape) for t in adapter}, declared)
    if stats:
        st = target_stats(adapter)
        for row in doc["per_target"]:
            row["stats"] = st[row["target"]]
    return doc


def _is_model(src) -> bool:
    """Whether `src` is a model rather than an adapter: a folder of model weights without adapter_config.json,
    or a .safetensors file that no dialect claims (only the native reader's fallback), with tensors and no key
    or metadata that mentions LoRA or loratool."""
    from ..io import registry
    from .model_info import is_model_folder

    p = src.path
    if p.is_dir():
        return is_model_folder(p)
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    hdr = src.checked_header()  # a broken container is refused here as it would be by any reader
    if not hdr.tensors or any(k.startswith("loratool.") for k in hdr.metadata) or \
            any("lora" in n.lower() for n in hdr.tensors):
        return False
    return registry.detect(src).name == "loratool"


def _peft_config(path) -> dict | None:
    """adapter_config.json of a PEFT folder (or beside its weights file) as a dict, for its training fields; None
    when there is none (the reader has already checked it when there is)."""
    from pathlib import Path

    from ..container import read_json_file

    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "adapter_config.json"
    if not cfg.is_file():
        return None
    doc = read_json_file(cfg, "PEFT adapter_config.json")
    return doc if isinstance(doc, dict) else None


def summary(adapter: Adapter, header=None) -> dict:
    """Header-level summary of an adapter (factors not needed): counts, ranks, alphas, scales, dtypes."""
    ranks, alphas, scales, layouts = Counter(), Counter(), Counter(), Counter()
    dtypes = Counter()
    rows = []
    unknown = bool(adapter.info.get("alpha_unknown"))  # alphas are NaN: shown as None, never counted
    for t in adapter:
        layouts[t.layout] += 1
        for b in t.blocks:
            if not unknown:
                alphas[b.alpha] += 1
                scales[round(b.scale, 12)] += 1
        ranks[t.rank] += 1
        row = {
            "target": t.key, "kind": t.kind, "layout": t.layout, "shape": list(t.shape), "rank": t.rank,
            "blocks": [{"rank": b.rank, "alpha": None if unknown else b.alpha, "scale": None if unknown else b.scale,
                        "scale_rule": b.scale_rule, "rows": list(b.rows), "cols": list(b.cols)} for b in t.blocks],
        }
        if t.kind == "full":
            row["scale"] = None if unknown and t.info.get("peft") == "lora_B.bias" else t.delta_scale
        if t.dtype or t.sha256:
            row["fingerprint"] = {"dtype": t.dtype, "sha256": t.sha256}
        if t.info:
            row["info"] = dict(t.info)
        rows.append(row)
    out = {
        "targets": len(adapter),
        "parameters": adapter.n_params,
        "rank_histogram": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {repr(k): v for k, v in sorted(alphas.items())},
        "scales": {repr(k): v for k, v in sorted(scales.items())},
        "layouts": dict(sorted(layouts.items())),
        "fingerprint": {
            "dtypes": sum(1 for t in adapter if t.dtype),
            "sha256": sum(1 for t in adapter if t.sha256),
        },
        "metadata": dict(adapter.metadata),
        "info": dict(adapter.info),
        "per_target": rows,
    }
    if header is not None:
        for info in header.tensors.values():
            dtypes[info.dtype] += 1
        out["dtypes"] = dict(sorted(dtypes.items()))
        out["bytes"] = header.file_size
    return out


def target_stats(adapter: Adapter) -> dict[str, dict]:
    """Per target ||ΔW||_F, ranks for 90% and 99% of the energy and non-finite counts, from the factors.

    Factors may be numpy arrays or torch tensors; the linear algebra is ops.linalg's (factored, never out x in).
    """
    import numpy as np

    from ..ops.linalg import energy_rank, frobenius_norm, singular_values

    out = {}
    for t in adapter.as_numpy():
        tensors = [t.delta] if t.kind == "full" else [x for b in t.blocks for x in (b.A, b.B)]
        nonfinite = sum(int(x.size - np.count_nonzero(np.isfinite(x))) for x in tensors)
        if nonfinite:
            out[t.key] = {"norm": None, "rank90": None, "rank99": None, "nonfinite": nonfinite}
            continue
        S = singular_values(t)
        out[t.key] = {"norm": frobenius_norm(t), "rank90": energy_rank(S, 0.90), "rank99": energy_rank(S, 0.99),
                      "nonfinite": 0}
    return out



__all__ = ["inspect", "summary", "target_stats"]
