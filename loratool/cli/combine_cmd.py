"""`loratool combine`: weighted combinations of adapters, exact (concat) or compressed (svd, ties, dare)."""

from __future__ import annotations

import click

from .options import dialect_options, load_inputs, reader_options_of


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 1,0.5,-0.25")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output adapter (.safetensors, loratool format).")
@click.option("--weights", callback=_weights, help="One weight per adapter, comma separated (default all 1); "
              "write --weights=-1,1 when the first is negative.")
@click.option("--method", type=click.Choice(["concat", "svd", "ties", "dare"]), default="concat", show_default=True,
              help="How to combine (described above).")
@click.option("--rank", type=click.IntRange(min=1), help="Output rank per block group (svd, ties, dare).")
@click.option("--density", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Fraction of entries kept per adapter (ties, dare).")
@click.option("--seed", type=int, default=None, help="Seed of the dare masks (default 0).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (the per-target report).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@dialect_options
def combine(paths, output, weights, method, rank, density, seed, overwrite, json_, quiet, **reader):
    """Combine adapters into one: ΔW = Σ w_i ΔW_i, exactly or compressed.

    Targets are the union of the inputs' targets; a target that differs in kind, layout or shape between
    inputs is refused. Ranks, weights (negative too) and scale rules may differ.

    concat (default): exactly Σ w_i ΔW_i. Blocks are appended with alpha_i·w_i, factors unchanged, so there
    are no cross terms B_i·A_j and no rsLoRA over-scaling. The output rank is the sum of the input ranks.

    svd: the concat sum truncated to --rank per block group from the factors (never out x in); a group whose
    blocks share one scale keeps it, otherwise the new block has alpha = rank (scale 1).

    ties: TIES-Merging (Yadav et al. 2023) on τ_i = w_i·ΔW_i, dense per target: keep the top --density
    fraction of each τ_i by magnitude, elect the sign of Σ τ_i per entry, and average the kept τ_i that agree
    with it (mean over the agreeing adapters only); then truncate to --rank (new blocks have scale 1).

    dare: DARE (Yu et al. 2023): drop each entry of each ΔW_i with probability 1−density, divide the rest by
    density, and sum with the weights (PEFT's dare_linear); masks seeded by --seed and the target key; then
    truncate to --rank (new blocks have scale 1).

    Example:

    \b
        loratool combine style.safetensors subject.safetensors -o both.safetensors --weights 0.7,1
        loratool combine a.safetensors b.safetensors -o ab16.safetensors --method svd --rank 16
        loratool combine a.safetensors b.safetensors -o t.safetensors --method ties --density 0.2 --rank 16
    """
    if weights is not None and len(weights) != len(paths):
        raise click.BadParameter(f"{len(weights)} weights for {len(paths)} adapters; give one per adapter",
                                 param_hint="--weights")
    if method == "concat" and rank is not None:
        raise click.UsageError("--rank applies to --method svd, ties and dare; concat keeps every rank "
                               "(run `loratool rescale --rank` afterwards, or use --method svd)")
    if method != "concat" and rank is None:
        raise click.UsageError(f"--method {method} needs --rank")
    if method in ("ties", "dare") and density is None:
        raise click.UsageError(f"--method {method} needs --density")
    if method not in ("ties", "dare") and density is not None:
        raise click.UsageError("--density applies to --method ties and dare")
    if method != "dare" and seed is not None:
        raise click.UsageError("--seed applies to --method dare")
    from ..fsutil import check_output
    from ..io.native import save
    from ..ops.combine import combine as run
    from .render import Progress, escape

    opts = reader_options_of(reader)
    check_output(output, [*paths, opts["base"]], overwrite)
    adapters = load_inputs(paths, opts)
    total = len({t.key for a in adapters for t in a})
    with Progress("combine", total=total, enabled=not (quiet or json_)) as progress:
        res = run(adapters, weights=weights, method=method, rank=rank, density=density,
                  seed=0 if seed is None else seed, names=[escape(str(p)) for p in paths], progress=progress)
    nbytes = save(res.adapter, output)
    if json_:
        from .render import emit_json

        emit_json({"inputs": [str(p) for p in paths], "output": str(output), **res.adapter.info["combine"],
                   "bytes": nbytes, "parameters": res.adapter.n_params, "targets": res.rows})
        return
    from .render import err, fmt_bytes, fmt_num, table, write

    rows = [(r["target"], r["kind"], ",".join(str(i + 1) for i in r["adapters"]), fmt_num(r["rank_before"]),
             fmt_num(r["rank_after"]), f"{r['energy_retained']:.6f}") for r in res.rows]
    write(table(None, ["target", "kind", "from", "rank in", "rank out", "energy retained"], rows,
                    justify={"rank in": "right", "rank out": "right", "energy retained": "right"}))
    if not quiet:
        err.print(f"wrote {output} ({fmt_bytes(nbytes)}): {len(res.adapter)} targets from {len(paths)} adapters, "
                  f"method {method}")
