"""`loratool validate`: every rule of an adapter's dialect, and with --base, how it fits that base."""

from __future__ import annotations

import sys

import click

from ..tasks.serving import names as runtimes
from .options import dialect_options, reader_options_of


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--for", "for_", type=click.Choice(runtimes()),
              help="Also report what this runtime refuses or applies differently (any dialect; docs/runtimes.md).")
@click.option("--json", "json_", is_flag=True, help="Print the report (findings and fit) as one JSON document.")
@dialect_options
def validate(path, strict, for_, json_, **reader):
    """Check an adapter of any dialect against its rules; with --base, report how it fits the base.

    Every finding has a rule id: C, M, T, W (the loratool format), P (PEFT), K (kohya), L (loralib), and with
    --base B (base), F (fit). The fit report gives, per target, the base key, shapes, base dtype, scale,
    layout, blocks and tied tensors. Exit status 0 when valid, 1 when any error is found (or any warning, with
    --strict); with --for, 3 when the runtime refuses or mishandles the adapter (or warns, with --strict).

    Example:

        loratool validate adapter.safetensors --base model/ --strict

        loratool validate peft_adapter/ --base model/ --json

        loratool validate peft_adapter/ --for vllm
    """
    from ..tasks.validate import validate as run_validate

    opts = reader_options_of(reader)
    if for_ is not None:
        return _for_runtime(path, opts.get("base"), strict, for_, json_)
    rep = run_validate(path, **opts)
    failed = rep.failed(strict)
    if json_:
        from .render import emit_json

        emit_json(rep.as_dict(strict))
    else:
        from .render import render_validation

        render_validation(rep.as_dict(strict))
    sys.exit(1 if failed else 0)


def _for_runtime(path, base, strict, runtime, json_):
    """`--for RUNTIME`: the spec's rules on a native file, then the runtime's rules on any dialect."""
    from ..errors import SpecError
    from ..io.detect import detect
    from ..tasks.serving import check_runtime
    from ..tasks.validate import validate as validate_file

    try:
        dialect = detect(path)
    except SpecError:
        dialect = "loratool"  # a header too broken to sniff: validate reports exactly which rules it breaks

    rep = validate_file(path, base=base) if dialect == "loratool" else None
    spec_failed = rep is not None and (bool(rep.errors) or (strict and bool(rep.warnings)))
    found = [] if spec_failed else check_runtime(path, runtime, **({"base": base} if base and dialect in
                                                                    ("peft", "kohya") else {}))
    rt_failed = any(f.severity == "error" or strict for f in found)
    if json_:
        from .render import emit_json

        doc = {"path": str(path), "valid": not (spec_failed or rt_failed), "runtime": runtime,
               "runtime_findings": [f.as_dict() for f in found]}
        if rep is not None:
            doc.update(errors=len(rep.errors), warnings=len(rep.warnings), findings=[f.as_dict() for f in rep.findings])
        emit_json(doc)
    else:
        from .render import err, table, write

        if rep is not None and rep.findings:
            write(table(None, ["rule", "severity", "target", "message"],
                            [(f.rule, f.severity, f.target or "-", f.message) for f in rep.findings]))
        if found:
            write(table(None, ["rule", "severity", "message", "source"],
                            [(f.id, f.severity, f.message, f.source) for f in found]))
        n_err = sum(f.severity == "error" for f in found)
        verdict = "spec invalid" if spec_failed else f"{n_err} errors, {len(found) - n_err} warnings"
        err.print(f"{path}: for {runtime}: {verdict}")
    sys.exit(1 if spec_failed else 3 if rt_failed else 0)
