"""The click group. Commands live one per module and are imported only when invoked, so `--help` is
instant and never imports torch. `loratool.cli.main` runs it (and owns exit codes and signals)."""

from __future__ import annotations

import importlib

import click

from .. import __version__

# command name -> (module, function name, one-line help shown by `loratool --help`)
COMMANDS = {
    "inspect": ("loratool.cli.inspect_cmd", "inspect", "Summarise an adapter: targets, ranks, alphas, sizes."),
    "validate": ("loratool.cli.validate_cmd", "validate", "Check an adapter against every rule of the spec."),
    "convert": ("loratool.cli.convert_cmd", "convert", "Convert between loratool, PEFT, kohya and loralib exactly."),
    "merge": ("loratool.cli.merge_cmd", "merge", "Merge (or --unmerge) adapters into a base model, streaming."),
    "rescale": ("loratool.cli.rescale_cmd", "rescale", "Change an adapter's strength exactly or its rank optimally."),
    "combine": ("loratool.cli.combine_cmd", "combine", "Combine adapters: exact weighted sum, or svd/ties/dare."),
    "extract": ("loratool.cli.extract_cmd", "extract", "Extract an adapter from a finetuned model and its base (SVD)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        from ..errors import LoraToolError
        from .render import fail

        try:
            return super().invoke(ctx)
        except LoraToolError as e:
            fail(e)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
def cli():
    """loratool: validate, inspect, rescale, combine, merge and extract LoRA adapters.

    Exit codes: 0 ok, 1 validation failed, 2 usage, 3 bad input file, 4 adapter does not fit base,
    5 numeric problem, 6 file-system problem, 7 unsupported input, 130 interrupted (Ctrl-C),
    141 stdout closed early, 143 terminated (SIGTERM).
    """

