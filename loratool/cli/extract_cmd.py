"""`loratool extract`: a LoRA adapter from a finetuned model and its base, by truncated SVD of the difference."""

from __future__ import annotations

import click

from ..io.registry import writable
from .options import revision_option


@click.command()
@click.argument("finetuned", type=click.Path(exists=False, dir_okay=True))
@click.argument("base", type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", type=click.Path(dir_okay=True),
              help="Output file (a folder for --to peft). Default: FINETUNED-minus-BASE-r<rank>.safetensors here.")
@click.option("--rank", type=click.IntRange(min=1),
              help="Fixed rank for every target (capped by the matrix's smaller side). With --max-params: the "
                   "per-target cap (default 64).")
@click.option("--energy", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Per target, the smallest rank whose factors keep at least this fraction of ||ΔW||_F^2.")
@click.option("--threshold", type=click.FloatRange(0.0, min_open=True),
              help="Per target, keep every singular value >= this absolute value.")
@click.option("--max-params", type=click.IntRange(min=1),
              help="Global budget: greedy on σ² per parameter across all targets, at most this many parameters.")
@click.option("--targets", "targets", multiple=True, metavar="GLOB",
              help="Only tensors whose key matches this glob (repeatable). Default: every tensor.")
@click.option("--fan-in-fan-out", "fan_in_fan_out", multiple=True, metavar="GLOB",
              help="2-D weights stored (in, out), like GPT-2 Conv1D (repeatable). Automatic when a folder's "
                   "config.json says model_type gpt2.")
@click.option("--embeddings", is_flag=True, help="Factorise changed embeddings (layout embedding) instead of "
              "listing them.")
@click.option("--keep-full", is_flag=True, help="Store changed biases, norms (and embeddings, without "
              "--embeddings) whole as full targets instead of listing them.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the SVDs run (the same algorithm on both).")
@click.option("--to", "to", type=click.Choice(writable()), default=None,
              help="Output dialect.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Factor dtype (computed in float32, cast once; the error is measured after).")
@click.option("--clamp-quantile", type=click.FloatRange(0.0, 1.0, min_open=True),
              help="Clamp both factors to ± this quantile of their values (kohya's 0.99); works at any size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--oversample", type=click.IntRange(min=0), help="Extra sketch columns (default: the rank, >= 8).")
@click.option("--power-iterations", type=click.IntRange(min=0), help="Power iterations of the randomized SVD.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@revision_option
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (the report) instead of tables.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def extract(finetuned, base, output, rank, energy, threshold, max_params, targets, fan_in_fan_out, embeddings,
            keep_full, device, to, dtype, clamp_quantile, seed, oversample, power_iterations, overwrite, revision,
            json_, quiet):
    """Extract a LoRA adapter from a finetuned model and its base: ΔW = W_ft − W_base, truncated SVD.

    Both models may be .safetensors files, sharded Hugging Face folders, .pt/.pth/.bin state dicts or Hub ids
    (org/name, --revision), in any combination; they are read one tensor pair at a time. Choose the rank with exactly one of --rank,
    --energy, --threshold or --max-params. Each target gets B = U·diag(S), A = Vh, alpha = rank (scale 1).
    The report gives per target the rank, the relative Frobenius error ||ΔW − BA||/||ΔW|| and the energy
    kept; it is also stored in the adapter's metadata. Unchanged tensors are skipped; changed tensors
    that are not factorised (biases, norms, embeddings, integer buffers) are listed, never dropped silently.

    Example:

        loratool extract finetuned/ base/ --rank 16

        loratool extract ft.safetensors base.safetensors --energy 0.9 -o adapter.safetensors

        loratool extract ft/ base/ --rank 64 --max-params 20000000 --keep-full --to peft -o adapter/
    """
    from ..tasks.extract import extract as extract_files
    from .render import Progress

    chosen = [n for n, v in (("--energy", energy), ("--threshold", threshold)) if v is not None]
    if rank is not None and max_params is None:
        chosen.append("--rank")
    if max_params is not None:
        chosen.append("--max-params")
    if len(chosen) != 1:
        raise click.UsageError("choose exactly one of --rank, --energy, --threshold or --max-params (--rank "
                               "may be added to --max-params as a per-target cap)"
                               + (f"; got {', '.join(chosen)}" if chosen else ""))
    with Progress("extract", None, enabled=not (quiet or json_)) as bar:
        result = extract_files(finetuned, base, output=output, to=to, rank=rank, energy=energy, threshold=threshold,
                               max_params=max_params, targets=targets, fan_in_fan_out=fan_in_fan_out or None,
                               embeddings=embeddings, keep_full=keep_full, device=device, dtype=dtype,
                               clamp_quantile=clamp_quantile, seed=seed, oversample=oversample,
                               power_iterations=power_iterations, overwrite=overwrite, progress=bar,
                               revision=revision)
    _render(result, json_)


def _render(result, json_):
    from .render import emit_json, err, fmt_bytes, out, table

    s, out_path, nbytes = result.summary, result.output, result.bytes
    if json_:
        emit_json({"output": str(out_path), "bytes": nbytes, **s, "per_target": result.rows})
        return
    rows = [(r["key"], r["layout"], "x".join(map(str, r["shape"])), r["rank"] if r["layout"] != "full" else "whole",
             f"{r['rel_error']:.4g}", f"{r['energy']:.4f}", r["method"]) for r in result.rows]
    out.print(table(None, ["target", "layout", "shape", "rank", "rel. error", "energy", "svd"], rows,
                    justify={"rank": "right", "rel. error": "right", "energy": "right"}))
    if result.not_extracted:
        out.print()
        out.print(table("changed but not in the adapter", ["tensor", "shape", "why"],
                        [(r["key"], "x".join(map(str, r["shape"])), r["reason"]) for r in result.not_extracted]))
    for msg in s.get("ties", []):
        err.print(f"note: {msg}")
    err.print(f"wrote {out_path} ({fmt_bytes(nbytes)}): {s['targets']} factorised targets, {s['full_targets']} "
              f"whole, {s['parameters']:,} parameters; overall rel. error {s['rel_error']:.4g}, energy "
              f"{s['energy']:.4f}; {s['unchanged']} unchanged tensors skipped, {len(result.not_extracted)} changed "
              "tensors not stored")
