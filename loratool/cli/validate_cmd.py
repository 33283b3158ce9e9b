"""`loratool validate`: every rule of the spec, optionally against a base model."""

from __future__ import annotations

import sys

import click

from .options import revision_option


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("--base", type=click.Path(exists=False, dir_okay=True),
              help="Base model (.safetensors, Hugging Face folder, .pt/.pth/.bin, or a Hub id org/name) to check targets "
                   "against.")
@revision_option
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--json", "json_", is_flag=True, help="Print the findings as one JSON document.")
def validate(path, base, revision, strict, json_):
    """Check an adapter against every rule of the spec (and a base, with --base).

    Exit status 0 when valid, 1 when any error is found (or any warning, with --strict).

    Example:

        loratool validate adapter.safetensors --base model/ --strict
    """
    from ..tasks.validate import validate as validate_file
    from ..errors import SpecError
    from ..io.detect import detect

    try:
        dialect = detect(path)
    except SpecError:
        dialect = "loratool"  # a header too broken to sniff: validate reports exactly which rules it breaks
    if dialect != "loratool":
        raise SpecError(f"{path}: is a {dialect} adapter; `validate` checks loratool files, so run "
                        f"`loratool convert {path} -o adapter.safetensors --to loratool` first")
    rep = validate_file(path, base=base, revision=revision)
    failed = bool(rep.errors) or (strict and bool(rep.warnings))
    if json_:
        from .render import emit_json

        emit_json({"path": str(path), "valid": not failed, "errors": len(rep.errors),
                   "warnings": len(rep.warnings), "findings": [f.as_dict() for f in rep.findings]})
    else:
        from .render import err, out, table

        if rep.findings:
            out.print(table(None, ["rule", "severity", "target", "message"],
                            [(f.rule, f.severity, f.target or "-", f.message) for f in rep.findings]))
        n = len(rep.adapter) if rep.adapter is not None else 0
        verdict = "invalid" if failed else "valid"
        err.print(f"{path}: {verdict}: {len(rep.errors)} errors, {len(rep.warnings)} warnings, {n} targets")
    sys.exit(1 if failed else 0)
