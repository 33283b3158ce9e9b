"""`loratool validate`: every rule of an adapter's dialect, and with --base, how it fits that base."""

from __future__ import annotations

import sys

import click

from .options import dialect_options, reader_options


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--json", "json_", is_flag=True, help="Print the report (findings and fit) as one JSON document.")
@dialect_options
def validate(path, strict, json_, base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out):
    """Check an adapter of any dialect against its rules; with --base, report how it fits the base.

    Every finding has a rule id: C, M, T, W (the loratool format), P (PEFT), K (kohya), L (loralib), and with
    --base B (base), F (fit). The fit report gives, per target, the base key, shapes, base dtype, scale,
    layout, blocks and tied tensors. Exit status 0 when valid, 1 when any error is found (or any warning, with
    --strict).

    Example:

        loratool validate adapter.safetensors --base model/ --strict

        loratool validate peft_adapter/ --base model/ --json
    """
    from ..tasks.validate import validate as run_validate

    rep = run_validate(path, **reader_options(base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out))
    failed = rep.failed(strict)
    if json_:
        from .render import emit_json

        emit_json(rep.as_dict(strict))
    else:
        from .render import render_validation

        render_validation(rep.as_dict(strict))
    sys.exit(1 if failed else 0)
