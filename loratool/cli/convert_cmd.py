"""`loratool convert`: read any supported dialect and write loratool, PEFT or kohya, exactly or not at all.

`dialect_options` and `reader_options` are shared with other commands that read foreign dialects
(inspect), so every command spells --base, --allow-unknown and the loralib options the same way.
"""

from __future__ import annotations

import click

TARGETS = ("loratool", "peft", "kohya")


def dialect_options(f):
    """Click options for reading PEFT, kohya and loralib adapters (see `reader_options`)."""
    opts = [
        click.option("--base", type=click.Path(exists=False, dir_okay=True),
                     help="Base model (.safetensors, Hugging Face folder, .pt/.pth/.bin): maps kohya names to dotted "
                          "keys, resolves PEFT prefixes, checks shapes, and turns PEFT's saved whole tensors into "
                          "deltas."),
        click.option("--allow-unknown", is_flag=True,
                     help="Ignore keys that are not LoRA tensors of the dialect (they are listed in the output's "
                          "info) instead of failing."),
        click.option("--alpha", type=float, help="loralib only: the lora_alpha the layers were built with."),
        click.option("--r", "r", type=click.IntRange(min=1), help="loralib only: the r the layers were built with "
                     "(checked against the factors)."),
        click.option("--enable-lora", metavar="1,0,1", help="loralib only: MergedLinear's enable_lora, one 1 or 0 "
                     "per equal slice of the output rows."),
        click.option("--fan-in-fan-out", is_flag=True, help="loralib only: layers were built with "
                     "fan_in_fan_out=True (weights stored (in, out))."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out) -> dict:
    """The keyword options of io.detect.load_adapter for the values of `dialect_options`."""
    return {"base": base, "allow_unknown": allow_unknown, "alpha": alpha, "r": r, "enable_lora": enable_lora,
            "fan_in_fan_out": fan_in_fan_out}


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=True),
              help="Output: a .safetensors file (loratool, kohya) or a folder (peft).")
@click.option("--to", "to", required=True, type=click.Choice(TARGETS), help="Dialect to write.")
@dialect_options
@click.option("--kohya-prefix", default="lora_unet_", show_default=True,
              help="kohya only: prefix of names for targets that were not read from kohya (lora_unet_, lora_te_, "
                   "...).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print one JSON document describing the conversion.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def convert(path, output, to, base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out, kohya_prefix, overwrite,
            json_, quiet):
    """Convert an adapter between dialects without changing ΔW.

    Reads loratool, PEFT folders, kohya/sd-scripts .safetensors and loralib .pt state dicts; writes loratool,
    PEFT (a folder PeftModel.from_pretrained loads) or kohya. Per-module ranks and alphas become PEFT's
    rank_pattern/alpha_pattern; rsLoRA is kept; kohya alphas are chosen so each module's strength is
    unchanged. A conversion that cannot be exact (row blocks to PEFT, GPT-2 Conv1D to kohya, ...) is refused
    with the reason, and nothing is written. kohya names need --base to become dotted keys.

    Example:

        loratool convert peft_dir/ -o adapter.safetensors --to loratool

        loratool convert lora.safetensors -o peft_out/ --to peft --base unet.safetensors

        loratool convert lora.pt -o adapter.safetensors --to loratool --alpha 16 --enable-lora 1,0,1 --fan-in-fan-out
    """
    from ..errors import MismatchError
    from ..fsutil import check_output
    from ..io.detect import detect, load_adapter

    from pathlib import Path

    if to == "peft" and Path(output).suffix in (".safetensors", ".bin", ".pt", ".pth"):
        raise click.UsageError(f"--to peft writes a folder (adapter_config.json + adapter_model.safetensors); "
                               f"give -o a folder name, not {Path(output).name}")
    if to != "peft" and Path(output).suffix != ".safetensors":
        raise click.UsageError(f"--to {to} writes one .safetensors file; give -o a name ending in .safetensors")
    check_output(output, [path, base], overwrite)
    dialect = detect(path)
    adapter = load_adapter(path, dialect=dialect,
                           **reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out))
    if adapter.info.get("kohya_unmapped") and to != "kohya":
        raise MismatchError(f"{path}: kohya names such as \"{next(iter(adapter.targets))}\" cannot be turned back "
                            "into dotted module paths without the model; pass --base")
    if to == "loratool":
        from ..io.native import save

        nbytes = save(adapter, output)
    elif to == "peft":
        from ..io.peft import save

        nbytes = save(adapter, output, overwrite=overwrite)
    else:
        from ..io.kohya import save

        nbytes = save(adapter, output, prefix=kohya_prefix)
    doc = {"input": str(path), "dialect": dialect, "output": str(output), "to": to, "targets": len(adapter),
           "parameters": adapter.n_params, "bytes": nbytes, "info": dict(adapter.info)}
    if json_:
        from .render import emit_json

        emit_json(doc)
    elif not quiet:
        from .render import err, fmt_bytes

        err.print(f"{path} ({dialect}) -> {output} ({to}): {len(adapter)} targets, {adapter.n_params:,} parameters, "
                  f"{fmt_bytes(nbytes)}")
        if adapter.info.get("unknown_keys"):
            from ..io._common import listing

            err.print(f"ignored {len(adapter.info['unknown_keys'])} unknown key(s) (--allow-unknown): "
                      f"{listing(adapter.info['unknown_keys'])}")
