"""`loratool inspect`: summarise an adapter from its header alone (no torch) unless --stats is given."""

from __future__ import annotations

import click

from .options import dialect_options, reader_options


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("--json", "json_", is_flag=True, help="Print one JSON document instead of tables.")
@click.option("--stats", is_flag=True, help="Read the factors and add ||ΔW||_F, 90%/99% energy ranks and "
              "non-finite counts per target (computed from the factors, never out x in).")
@dialect_options
def inspect(path, json_, stats, base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out):
    """Summarise an adapter: format, targets, rank histogram, alpha and scale, dtypes, size.

    By default only the header is read, so it is instant on any file size.

    Example:

        loratool inspect adapter.safetensors

        loratool inspect adapter.safetensors --stats --json

        loratool inspect kohya_lora.safetensors --base unet.safetensors --allow-unknown
    """
    from pathlib import Path

    from .. import spec
    from ..api import summary
    from ..io.detect import detect, load_adapter
    from ..io.native import attach, report_error
    from ..validation import validate_header

    rep = None
    if Path(path).suffix == ".safetensors" and Path(path).is_file():
        # One header parse serves both detection and the summary (it is most of inspect's time).
        rep = validate_header(path)
        if rep.header is None:
            raise report_error(rep)
    dialect = "loratool" if rep is not None and spec.KEY_FORMAT in rep.header.metadata else detect(path)
    opts = reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out)
    if dialect == "loratool":
        if any(v not in (None, False) for v in opts.values()):
            load_adapter(path, dialect=dialect, **opts)  # refuses the options a loratool file does not take
        if rep.errors:
            raise report_error(rep)
        adapter, header = rep.adapter, rep.header
        doc = {"path": str(path), "dialect": dialect, "format": header.metadata.get(spec.KEY_FORMAT),
               "spec_version": header.metadata.get(spec.KEY_VERSION)}
        if stats:
            from ..container import read_arrays

            adapter = attach(adapter, read_arrays(path, header))  # numpy arrays: --stats imports no torch
    else:
        adapter, header = load_adapter(path, dialect=dialect, **opts), None
        doc = {"path": str(path), "dialect": dialect, "format": None, "spec_version": None,
               "unknown_keys": list(adapter.info.get("unknown_keys", []))}
    doc.update(summary(adapter, header))
    if stats:
        from ..api import target_stats

        st = target_stats(adapter)
        for row in doc["per_target"]:
            row["stats"] = st[row["target"]]
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
    for key in ("note", "alpha_defaulted", "shape_guessed"):  # what a foreign dialect's reader had to assume
        if isinstance(info.get(key), str):
            lines.append((key.replace("_", " "), info[key]))
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
