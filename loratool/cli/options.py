"""Options shared by every command that reads adapters, so each spells --base, --allow-unknown and the
loralib options the same way and passes them to `io.detect.load_adapter`."""

from __future__ import annotations

import click


def dialect_options(f=None, *, alpha_flag: str = "--alpha", with_base: bool = True):
    """Click options for reading PEFT, kohya and loralib adapters (see `reader_options`).

    `alpha_flag` renames loralib's --alpha for commands that have an --alpha of their own (rescale);
    `with_base=False` leaves out --base for commands whose base model is an argument (merge)."""
    if f is None:
        return lambda g: dialect_options(g, alpha_flag=alpha_flag, with_base=with_base)
    opts = [
        click.option("--base", type=click.Path(exists=False, dir_okay=True),
                     help="Base model (.safetensors, Hugging Face folder, .pt/.pth/.bin): maps kohya names to dotted "
                          "keys, resolves PEFT prefixes, checks shapes, and turns PEFT's saved whole tensors into "
                          "deltas."),
        click.option("--allow-unknown", is_flag=True,
                     help="Ignore keys that are not LoRA tensors of the dialect (they are listed in the output's "
                          "info) instead of failing."),
        click.option(alpha_flag, "alpha" if alpha_flag == "--alpha" else "lora_alpha", type=float,
                     help="loralib only: the lora_alpha the layers were built with."),
        click.option("--r", "r", type=click.IntRange(min=1), help="loralib only: the r the layers were built with "
                     "(checked against the factors)."),
        click.option("--enable-lora", metavar="1,0,1", help="loralib only: MergedLinear's enable_lora, one 1 or 0 "
                     "per equal slice of the output rows."),
        click.option("--fan-in-fan-out", is_flag=True, help="loralib only: layers were built with "
                     "fan_in_fan_out=True (weights stored (in, out))."),
    ]
    if not with_base:
        opts = opts[1:]
    for opt in reversed(opts):
        f = opt(f)
    return f


def reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out) -> dict:
    """The keyword options of io.detect.load_adapter for the values of `dialect_options`."""
    return {"base": base, "allow_unknown": allow_unknown, "alpha": alpha, "r": r, "enable_lora": enable_lora,
            "fan_in_fan_out": fan_in_fan_out}


def reader_options_of(kw: dict, base=None) -> dict:
    """Pop the `dialect_options` values out of a command's keyword arguments; `base` (a command's own base
    model argument) stands in for --base when that is not given."""
    names = ("allow_unknown", "r", "enable_lora", "fan_in_fan_out")
    vals = {n: kw.pop(n) for n in names}
    vals["base"] = kw.pop("base", None)
    vals["alpha"] = kw.pop("lora_alpha") if "lora_alpha" in kw else kw.pop("alpha")
    if vals["base"] is None:
        vals["base"] = base
    return reader_options(**vals)
