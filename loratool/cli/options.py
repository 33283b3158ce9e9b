"""Options shared by every command that reads adapters, so each spells --base, --allow-unknown, --allow-partial,
--revision, the loralib options and the --targets/--exclude selection the same way and passes them to the
tasks."""

from __future__ import annotations

import click


REVISION_HELP = ("Hugging Face Hub revision (branch, tag or commit) of every Hub id (org/name) given without its own "
                 "@REV; default main.")


def revision_option(f):
    """--revision: the Hub revision of the Hub ids among the inputs (io.hub)."""
    return click.option("--revision", metavar="REV", help=REVISION_HELP)(f)


def selection_options(f):
    """--targets / --exclude: fnmatch globs choosing the adapter targets a command uses
    (tasks._inputs.select_targets)."""
    f = click.option("--exclude", "exclude", multiple=True, metavar="GLOB",
                     help="Leave out targets whose base key, module path or kohya name matches this glob "
                          "(repeatable); they are reported.")(f)
    return click.option("--targets", "targets", multiple=True, metavar="GLOB",
                        help="Only targets whose base key, module path or kohya name matches this glob "
                             "(repeatable; default all); the others are reported.")(f)


def dialect_options(f=None, *, alpha_flag: str = "--alpha", with_base: bool = True):
    """Click options for reading PEFT, kohya and loralib adapters (see `reader_options`), and --revision.

    `alpha_flag` renames loralib's --alpha for commands that have an --alpha of their own (rescale);
    `with_base=False` leaves out --base and --allow-partial for commands whose base model is an argument
    (merge, which has an --allow-partial of its own)."""
    if f is None:
        return lambda g: dialect_options(g, alpha_flag=alpha_flag, with_base=with_base)
    opts = [
        click.option("--base", type=click.Path(exists=False, dir_okay=True),
                     help="Base model (.safetensors, Hugging Face folder, .pt/.pth/.bin, or a Hub id org/name): maps "
                          "kohya names to dotted keys, resolves PEFT prefixes, checks shapes, and turns PEFT's saved "
                          "whole tensors into deltas."),
        click.option("--allow-partial", is_flag=True,
                     help="With --base: skip (and report) the modules of a PEFT, kohya or loralib adapter that map "
                          "to no base key or do not fit it, instead of failing."),
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
        click.option("--revision", metavar="REV", help=REVISION_HELP),
    ]
    if not with_base:
        opts = opts[2:]
    for opt in reversed(opts):
        f = opt(f)
    return f


def reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out, allow_partial=False,
                   revision=None) -> dict:
    """The keyword options of the tasks for the values of `dialect_options`: the reader options of
    io.detect.load_adapter, and the Hub `revision` (a keyword of every task, never handed to a reader)."""
    return {"base": base, "allow_unknown": allow_unknown, "allow_partial": allow_partial, "alpha": alpha, "r": r,
            "enable_lora": enable_lora, "fan_in_fan_out": fan_in_fan_out, "revision": revision}


def reader_options_of(kw: dict, base=None) -> dict:
    """Pop the `dialect_options` values out of a command's keyword arguments; `base` (a command's own base
    model argument) stands in for --base when that is not given."""
    names = ("allow_unknown", "r", "enable_lora", "fan_in_fan_out", "revision")
    vals = {n: kw.pop(n) for n in names}
    vals["allow_partial"] = kw.pop("allow_partial", False)
    vals["base"] = kw.pop("base", None)
    vals["alpha"] = kw.pop("lora_alpha") if "lora_alpha" in kw else kw.pop("alpha")
    if vals["base"] is None:
        vals["base"] = base
    return reader_options(**vals)
