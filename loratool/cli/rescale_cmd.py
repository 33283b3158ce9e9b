"""`loratool rescale`: change an adapter's strength exactly, or its rank optimally, in factored form."""

from __future__ import annotations

import click

from ..io.registry import writable
from .options import dialect_options, reader_options_of

WRITABLE = writable()

LORA_ALPHA_FLAG = "--lora-alpha"  # loralib's --alpha, renamed here: rescale has an --alpha of its own


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output adapter: a .safetensors file (loratool), a folder (PEFT), or as --to says.")
@click.option("--to", type=click.Choice(WRITABLE), help="The dialect to write (default: from the output's name).")
@click.option("--scale", type=float, help="Multiply the whole delta by S (every alpha and full-target scale).")
@click.option("--alpha", type=float, help="Set every block's alpha to A (the same as --scale A/old_alpha); "
              "refused when blocks have different alphas.")
@click.option("--rank", type=click.IntRange(min=1), help="Truncate each block group to at most R singular values.")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Keep the fewest singular values per block group that retain fraction F of ||ΔW||_F^2.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (the per-target report).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@dialect_options(alpha_flag=LORA_ALPHA_FLAG)
def rescale(path, output, to, scale, alpha, rank, energy, overwrite, json_, quiet, **reader):
    """Rescale an adapter: strength exactly (--scale, --alpha) or rank optimally (--rank, --energy).

    Give exactly one of the four options.

    --scale S and --alpha A give ΔW' = S·ΔW exactly, for rsLoRA and per-block alphas too: they change only
    alphas (and full-target scales), never a factor.

    --rank R and --energy F give the Eckart-Young truncation of each target's delta, computed from the
    factors (QR of B and Aᵀ, SVD of the small core), never forming the out x in matrix. The strength is kept:
    a truncated block keeps the scale of the blocks it replaces (alpha = scale·r_new, or scale·√r_new for
    rsLoRA). Blocks whose rectangles overlap are truncated together; disjoint blocks (a fused qkv adapted
    on some slices) are truncated one by one, so R applies per block group. Full targets are kept. The
    retained energy of each target is printed and recorded in the target's info (energy_retained,
    rank_before).

    Written to PEFT or kohya, a target left with several blocks becomes one exact A/B pair of rank Σ r_i
    (alpha = rank). A kohya input read without --base is written as kohya again (its target keys are kohya
    names, which only kohya holds); another dialect needs --base.

    Example:

    \b
        loratool rescale adapter.safetensors -o half.safetensors --scale 0.5
        loratool rescale adapter.safetensors -o r16.safetensors --rank 16
        loratool rescale adapter.safetensors -o e99.safetensors --energy 0.99 --json
    """
    given = [n for n, v in (("--scale", scale), ("--alpha", alpha), ("--rank", rank), ("--energy", energy))
             if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --scale, --alpha, --rank, --energy"
                               + (f" (got {', '.join(given)})" if given else ""))
    from ..tasks.rescale import rescale as run
    from .render import Progress

    opts = reader_options_of(reader)
    opts["lora_alpha"] = opts.pop("alpha")  # the library's name for loralib's alpha beside rescale's own
    with Progress("rescale", total=None, enabled=not (quiet or json_)) as progress:
        res = run(path, scale=scale, alpha=alpha, rank=rank, energy=energy, output=output, to=to,
                  overwrite=overwrite, progress=progress, flags={"alpha": LORA_ALPHA_FLAG}, **opts)
    if json_:
        from .render import emit_json

        emit_json({"input": str(path), **res.report()})
        return
    _render(res, output, res.bytes, quiet)


def _render(res, output, nbytes, quiet):
    from .render import err, fmt_bytes, fmt_num, table, write

    if res.operation in ("rank", "energy"):
        rows = [(r["target"], r["kind"], fmt_num(r["rank_before"]), fmt_num(r["rank_after"]),
                 f"{r['blocks_before']} -> {r['blocks_after']}", f"{r['energy_retained']:.6f}",
                 f"{r['relative_error']:.3g}") for r in res.rows]
        write(table(None, ["target", "kind", "rank before", "rank after", "blocks", "energy retained",
                               "rel. error"], rows,
                        justify={"rank before": "right", "rank after": "right", "energy retained": "right",
                                 "rel. error": "right"}))
    if not quiet:
        what = f"strength x{res.scale:g}" if res.scale is not None else \
            f"{res.parameters_before:,} -> {res.adapter.n_params:,} parameters"
        err.print(f"wrote {output} ({res.to}, {fmt_bytes(nbytes)}): {len(res.adapter)} targets, {what}")
