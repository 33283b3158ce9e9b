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
    """Describe an adapter or a model: format, targets, ranks, alpha and scale, dtypes, size, a guess of the
    base model it is for, and its training metadata.

    By default only headers and configs are read (a native file, a PEFT folder with
    adapter_model.safetensors, a kohya file, a model folder or file), so it is instant on any file size and
    never imports torch. What is missing is described, not refused: a loralib file without --alpha or a
    PEFT weights file without adapter_config.json shows its ranks with alpha unknown; a model folder or
    model file is described as a model.

    Example:

        loratool inspect adapter.safetensors

        loratool inspect adapter.safetensors --stats --json

        loratool inspect kohya_lora.safetensors --base unet.safetensors --allow-unknown

        loratool inspect org/peft-adapter --revision v1

        loratool inspect Llama-3-8B/
    """
    from ..tasks.inspect import inspect as summarise

    doc = summarise(path, stats=stats, **reader_options_of(reader))
    if json_:
        from .render import emit_json

        emit_json(doc)
        return
    if doc["kind"] == "model":
        _render_model(doc)
        return
    _render(doc, stats)


# config.json fields on the model's "config" line: (field, how it reads)
CONFIG_WORDS = (("model_type", "type {}"), ("hidden_size", "hidden {}"), ("num_layers", "{} layers"),
                ("intermediate_size", "intermediate {}"), ("num_attention_heads", "{} heads"),
                ("num_key_value_heads", "{} kv heads"), ("vocab_size", "vocab {}"),
                ("cross_attention_dim", "cross-attention {}"), ("torch_dtype", "{}"))


def _render_model(doc):
    from .render import fmt_bytes, write_fields

    lines = [("path", doc["path"]), ("kind", f"model ({doc['format']}, {doc['files']} file(s))"),
             ("tensors", f"{doc['tensors']:,}"), ("parameters", f"{doc['parameters']:,}"),
             ("dtypes", ", ".join(f"{k}: {v}" for k, v in doc["dtypes"].items()) or "-"),
             ("size", fmt_bytes(doc["bytes"]))]
    cfg = doc["config"]
    if cfg:
        words = [fmt.format(cfg[k]) for k, fmt in CONFIG_WORDS if k in cfg]
        lines.append(("config", ", ".join(([cfg["architecture"]] if "architecture" in cfg else []) + words)))
    if doc["tied_embeddings"] is not None:
        tie = doc["tied_embeddings"]
        lines.append(("tied embeddings", f"{'yes' if tie['tied'] else 'no'} (from {tie['from']})"))
    lines += _guess_lines(doc["guess"]) + _training_lines(doc["training"])
    lines += [("note", n) for n in doc["notes"]] + [("hint", doc["hint"])]
    write_fields(lines)


def _guess_lines(g) -> list:
    """The guess on one line, its evidence on the next ones."""
    if g["family"] is None:
        return [("base guess", "unknown (" + "; ".join(g["evidence"]) + ")")]
    what = g["model"] or f"a {g['family']} model"
    return [("base guess", f"{what} (confidence {g['confidence']})")] + [("", e) for e in g["evidence"]]


def _training_lines(tr) -> list:
    """The training metadata on a few lines: what it was trained on, how, with what, and what it is called."""
    k, lines = tr.get("kohya") or {}, []

    def joined(pairs):
        return ", ".join(f"{label} {k[key]}" for label, key in pairs if key in k)

    on = " ".join(x for x in (k.get("ss_sd_model_name"), f"({k['ss_base_model_version']})"
                              if "ss_base_model_version" in k else None) if x)
    for label, text in (("trained on", on),
                        ("network", joined((("", "ss_network_module"), ("dim", "ss_network_dim"),
                                            ("alpha", "ss_network_alpha"), ("args", "ss_network_args"))).lstrip()),
                        ("training", joined((("images", "ss_num_train_images"), ("epochs", "ss_epoch"),
                                             ("lr", "ss_learning_rate"), ("resolution", "ss_resolution")))),
                        ("output name", k.get("ss_output_name"))):
        if text:
            lines.append((label, text))
    if tr.get("trigger_words"):
        lines.append(("trigger words", ", ".join(f"{t} ({n})" for t, n in tr["trigger_words"])))
    spec = tr.get("modelspec") or {}
    if spec:  # a thumbnail is an image: named, not printed
        lines.append(("modelspec", ", ".join(f"{key.removeprefix('modelspec.')}={'(image)' if 'thumbnail' in key else v}"
                                             for key, v in spec.items())))
    peft = tr.get("peft") or {}
    if peft:
        lines.append(("peft", ", ".join(f"{key} {v}" for key, v in peft.items())))
    return lines + [("note", n) for n in tr.get("notes", [])]


def _render(doc, stats):
    from .render import fmt_bytes, fmt_num, table, write, write_fields

    unknown = doc.get("alpha_unknown")
    lines = [
        ("path", doc["path"]),
        ("dialect", doc["dialect"] + (f" (spec {doc['spec_version']})" if doc.get("spec_version") else "")),
        ("targets", doc["targets"]),
        ("parameters", f"{doc['parameters']:,}"),
        ("ranks", ", ".join(f"{k}: {v}" for k, v in doc["rank_histogram"].items()) or "-"),
        ("alphas", f"unknown ({unknown})" if unknown else
         ", ".join(f"{k} ({v})" for k, v in doc["alphas"].items()) or "-"),
        ("scales", "unknown" if unknown else ", ".join(f"{k} ({v})" for k, v in doc["scales"].items()) or "-"),
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
    lines += _guess_lines(doc["guess"]) + _training_lines(doc["training"])
    write_fields(lines)
    if doc["replacements"]:
        write()
        write("replacements (saved whole tensors; pass --base to store them as deltas):")
        write(table(None, ["key", "tensor", "shape", "dtype"],
                    [[r["key"] or "(beside LoRA factors)", r["tensor"],
                      "x".join(map(str, r["shape"] or [])) or "-", r["dtype"] or "-"] for r in doc["replacements"]]))
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
