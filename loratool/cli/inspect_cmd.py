"""`loratool inspect`: summarise an adapter from its headers and configs alone (no torch) unless --stats is
given."""

from __future__ import annotations

import click

from .options import dialect_options, reader_options_of


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("--json", "json_", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--stats", is_flag=True, help="Read the factors and add ||ΔW||_F, 90%/99% energy ranks and "
              "non-finite counts per target (computed from the factors, never out x in).")
@dialect_options
def inspect(path, json_, stats, **reader):
    """Summarise an adapter: format, targets, rank histogram, alpha and scale, dtypes, size.

    By default only headers and configs are read (a native file, a PEFT folder with
    adapter_model.safetensors, a kohya file), so it is instant on any file size and never imports torch.

    Example:

        loratool inspect adapter.safetensors

        loratool inspect adapter.safetensors --stats --json

        loratool inspect kohya_lora.safetensors --base unet.safetensors --allow-unknown

        loratool inspect org/peft-adapter --revision v1
    """
    from ..tasks.inspect import inspect as summarise

    doc = summarise(path, stats=stats, **reader_options_of(reader))
    if json_:
        from .render import emit_json

        emit_json(doc)
        return
    _render(doc, stats)


def _render(doc, stats):
    from .render import escape, fmt_bytes, fmt_num, table, write

    lines = [
        ("path", doc["path"]),
        ("dialect", doc["dialect"] + (f" (spec {doc['spec_version']})" if doc.get("spec_version") else "")),
        ("targets", doc["targets"]),
        ("parameters", f"{doc['parameters']:,}"),
        ("ranks", ", ".join(f"{k}: {v}" for k, v in doc["rank_histogram"].items()) or "-"),
        ("alphas", ", ".join(f"{k} ({v})" for k, v in doc["alphas"].items()) or "-"),
        ("scales", ", ".join(f"{k} ({v})" for k, v in doc["scales"].items()) or "-"),
        ("layouts", ", ".join(f"{k}: {v}" for k, v in doc["layouts"].items())),
    ]
    if "dtypes" in doc:
        lines.append(("dtypes", ", ".join(f"{k}: {v}" for k, v in doc["dtypes"].items())))
        lines.append(("size", fmt_bytes(doc["bytes"])))
    fp = doc["fingerprint"]
    lines.append(("base fingerprint", f"dtype on {fp['dtypes']} targets, sha256 on {fp['sha256']} targets"
                  if fp["dtypes"] or fp["sha256"] else "none"))
    info = doc.get("info") or {}
    for key in ("note", "alpha_defaulted", "shape_guessed", "needs_base"):  # what a foreign reader had to assume
        if isinstance(info.get(key), str):
            lines.append((key.replace("_", " "), info[key]))
    if info.get("skipped"):
        lines.append(("skipped", f"{len(info['skipped'])} module(s) that do not map to the base (--allow-partial): "
                      + "; ".join(info["skipped"])))
    if doc.get("unknown_keys"):
        lines.append(("unknown keys", f"{len(doc['unknown_keys'])} ignored (--allow-unknown): "
                      + ", ".join(doc["unknown_keys"])))
    for k, v in lines:
        write(f"{k + ':':<18}{escape(str(v))}")
    cols = ["target", "kind", "layout", "shape", "rank", "alpha", "scale", "blocks"]
    if stats:
        cols += ["‖ΔW‖_F", "r90", "r99", "non-finite"]
    rows = []
    for r in doc["per_target"]:
        b = r["blocks"]
        alpha = ",".join(fmt_num(x["alpha"]) for x in b) if b else "-"
        scale = ",".join(fmt_num(x["scale"]) for x in b) if b else fmt_num(r.get("scale"))
        idx = "whole" if len(b) == 1 and b[0]["rows"] == [0, _out(r)] else \
            " ".join(f"[{x['rows'][0]}:{x['rows'][1]}]" for x in b) or "-"
        row = [r["target"], r["kind"], r["layout"], "x".join(map(str, r["shape"])), r["rank"], alpha, scale, idx]
        if stats:
            s = r["stats"]
            row += [fmt_num(s["norm"]), fmt_num(s["rank90"]), fmt_num(s["rank99"]), s["nonfinite"]]
        rows.append(row)
    write()
    write(table(None, cols, rows, justify={"rank": "right", "r90": "right", "r99": "right"}))


def _out(row) -> int:
    from ..adapter import matrix_shape

    if row["kind"] == "full":
        return -1
    return matrix_shape(row["layout"], tuple(row["shape"]))[0]
