"""`loratool combine`: weighted combinations of adapters, exact (concat) or compressed (svd, ties, dare).

The methods, their options and their help paragraphs come from the registry (ops/combine_methods.py).
"""

from __future__ import annotations

import click

from ..io.registry import writable
from ..ops.combine_methods import DEFAULT, METHODS, PARAMETER_NAMES, usage_problem
from .options import dialect_options, reader_options_of

WRITABLE = writable()


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 1,0.5,-0.25")


def _meaning(name: str) -> str:
    """The help of option --name: what it means for each method that takes it (methods with one meaning
    grouped), e.g. "svd: ...; ties, dare: ..."."""
    by_meaning: dict[str, list[str]] = {}
    for m in METHODS.values():
        p = m.parameter(name)
        if p is not None:
            by_meaning.setdefault(p.meaning, []).append(m.name)
    return "; ".join(f"{', '.join(names)}: {meaning}" for meaning, names in by_meaning.items()) + "."


HELP = "\n\n".join([
    "Combine adapters into one: ΔW = Σ w_i ΔW_i, exactly or compressed.",
    "Targets are the union of the inputs' targets; a target that differs in kind, layout or shape between "
    "inputs is refused. Ranks, weights (negative too) and scale rules may differ.",
    "Written to PEFT or kohya, a target with several blocks becomes one exact A/B pair of rank Σ r_i (alpha = "
    "rank). kohya inputs read without --base are written as kohya again.",
    *(f"{m.name}{' (default)' if m.name == DEFAULT else ''}: {m.description}"
      + (f" ({m.paper}, arXiv:{m.arxiv}.)" if m.arxiv else "") for m in METHODS.values()),
    """Example:

\b
    loratool combine style.safetensors subject.safetensors -o both.safetensors --weights 0.7,1
    loratool combine a.safetensors b.safetensors -o ab16.safetensors --method svd --rank 16
    loratool combine a.safetensors b.safetensors -o t.safetensors --method ties --density 0.2 --rank 16""",
])


@click.command(help=HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output adapter: a .safetensors file (loratool), a folder (PEFT), or as --to says.")
@click.option("--to", type=click.Choice(WRITABLE), help="The dialect to write (default: from the output's name).")
@click.option("--weights", callback=_weights, help="One weight per adapter, comma separated (default all 1); "
              "write --weights=-1,1 when the first is negative.")
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT, show_default=True,
              help="How to combine (each method is described above).")
@click.option("--rank", type=click.IntRange(min=1), help=_meaning("rank"))
@click.option("--density", type=click.FloatRange(0.0, 1.0, min_open=True), help=_meaning("density"))
@click.option("--seed", type=int, default=None, help=_meaning("seed"))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (the per-target report).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@dialect_options
def combine(paths, output, to, weights, method, rank, density, seed, overwrite, json_, quiet, **reader):
    given = {n for n, v in zip(PARAMETER_NAMES, (rank, density, seed)) if v is not None}
    problem = usage_problem(method, given)
    if problem:
        raise click.UsageError(problem)
    from ..tasks.combine import combine as run
    from .render import Progress

    with Progress("combine", total=None, enabled=not (quiet or json_)) as progress:
        res = run(paths, weights=weights, method=method, rank=rank, density=density,
                  seed=0 if seed is None else seed, output=output, to=to, overwrite=overwrite, progress=progress,
                  **reader_options_of(reader))
    nbytes = res.bytes
    if json_:
        from .render import emit_json

        emit_json({"inputs": [str(p) for p in paths], **res.report()})
        return
    from .render import err, fmt_bytes, fmt_num, table, write

    rows = [(r["target"], r["kind"], ",".join(str(i + 1) for i in r["adapters"]), fmt_num(r["rank_before"]),
             fmt_num(r["rank_after"]), f"{r['energy_retained']:.6f}") for r in res.rows]
    write(table(None, ["target", "kind", "from", "rank in", "rank out", "energy retained"], rows,
                justify={"rank in": "right", "rank out": "right", "energy retained": "right"}))
    if not quiet:
        err.print(f"wrote {output} ({res.to}, {fmt_bytes(nbytes)}): {len(res.adapter)} targets from {len(paths)} "
                  f"adapters, method {method}")
