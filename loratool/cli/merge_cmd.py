"""`loratool merge`: stream W' = W + Σ w_i ΔW_i (or, with --unmerge, W = W' − Σ w_i ΔW_i) into a new base."""

from __future__ import annotations

import click

from .options import dialect_options, reader_options_of, selection_options

DTYPES = ("bfloat16", "float16", "float32", "float64")


@click.command()
@click.argument("base", type=click.Path(exists=False, dir_okay=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=True),
              help="Output file or folder; a .safetensors or .pt/.pth/.bin name chooses that format.")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 1,0.5 (default 1 each).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplies every adapter's weight.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Write every floating-point tensor in this dtype (default: keep each tensor's dtype).")
@click.option("--unmerge", is_flag=True, help="Subtract the adapters instead: turn a merged model back.")
@click.option("--verify", is_flag=True, help="Probe each merged target with a random x and compare W'x with "
              "Wx + s·B(Ax); report the largest relative error and refuse a wrong merge.")
@click.option("--allow-partial", is_flag=True, help="Skip (and report) targets that do not fit the base, and "
              "PEFT, kohya or loralib modules that map to no base key, instead of refusing.")
@click.option("--keep-tied", is_flag=True, help="On a base whose lm_head is tied to its embedding, merge an "
              "adapter on either into the one tensor so both sides move, as PEFT's merge_and_unload does "
              "(default: untie them, so the merged model equals the adapter model).")
@click.option("--keep-quantized", is_flag=True, help="Write quantized weights in their own scheme: FP8 only (the "
              "default for FP8 without --dtype); refused for bitsandbytes, GPTQ, AWQ and MXFP4 bases, which are "
              "always written dequantized.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the float32 arithmetic runs.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-fsync", is_flag=True, help="Skip the final fsync (the rename stays atomic; durability is "
              "left to the kernel, as with cp).")
@click.option("--json", "json_", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@dialect_options(with_base=False)
@selection_options
def merge(base, adapters, out, weights, scale, dtype, unmerge, verify, allow_partial, keep_tied, keep_quantized, device,
          overwrite, no_fsync, json_, quiet, targets, exclude, **reader):
    """Merge LoRA adapters into a base model, streaming one tensor at a time.

    W' = W + Σ w_i·ΔW_i computed in float32 and cast once to each tensor's dtype; tensors no adapter
    touches are copied as raw bytes. BASE is a .safetensors file, a .pt/.pth/.bin state dict or a Hugging
    Face folder (sharded or not; its other files are copied); BASE and PEFT adapters may also be Hugging Face
    Hub ids (org/name, --revision), read through the Hub cache (HF_HUB_OFFLINE=1: the cache only). Every
    adapter target must fit a floating-point base tensor of the same shape, or nothing is written.

    Quantized bases: FP8 weights are requantized with new scales (--dtype: written dequantized); bitsandbytes
    nf4/fp4/int8, GPTQ, AWQ and MXFP4 weights are written dequantized (bfloat16, or --dtype) with the adapters
    merged, which is what a QLoRA adapter was trained against, and config.json loses its quantization_config.

    Example:

    \b
        loratool merge model/ adapter/ -o merged/
        loratool merge base.safetensors a.safetensors b.safetensors --weights 1,0.5 -o out.safetensors
        loratool merge merged/ adapter/ --unmerge -o base-again/ --verify
        loratool merge meta-llama/Llama-3.2-1B org/my-adapter -o merged/ --exclude '*lm_head*'
    """
    from ..tasks.merge import merge as run
    from .render import Progress, emit_json, err, fmt_bytes

    opts = {k: v for k, v in reader_options_of(reader).items() if k not in ("base", "allow_partial")}
    revision = opts.pop("revision")
    ws = None
    if weights is not None:
        try:
            ws = [float(x) for x in weights.split(",")]
        except ValueError:
            raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers; write e.g. 1,0.5",
                                     param_hint="--weights") from None
    with Progress("merge", None, enabled=not (quiet or json_)) as bar:
        result = run(base, adapters, out, weights=ws, scale=scale, dtype=dtype, unmerge=unmerge, verify=verify,
                     allow_partial=allow_partial, device=device, overwrite=overwrite, fsync=not no_fsync,
                     progress=bar, reader_options=opts, revision=revision, targets=targets, exclude=exclude,
                     keep_tied=keep_tied, keep_quantized=keep_quantized)
    if json_:
        emit_json(result.as_dict())
        return
    for msg in result.skipped:
        err.print(f"skipped: {msg}")
    if result.excluded:
        err.print(f"left out {len(result.excluded)} target(s) by --targets/--exclude: {', '.join(result.excluded)}")
    for msg in result.skipped_files:
        err.print(f"not copied: {msg}")
    for msg in result.ties:
        err.print(f"note: {msg}")
    for msg in result.warnings:
        err.print(f"warning: {msg}")
    line = (f"{result.operation}d {result.terms} target(s) into {result.targets} tensor(s) of "
            f"{result.tensors}; wrote {fmt_bytes(result.bytes)} to {result.output} in {result.seconds:.2f} s")
    if result.skipped:
        line += f"; skipped {len(result.skipped)} target(s)"
    if result.verify:
        line += f"; verify: max relative error {result.verify['max_rel_error']:.3g}"
    if result.dequantized:
        schemes = sorted(set(result.dequantized.values()))
        line += f"; dequantized {len(result.dequantized)} quantized weight(s) ({', '.join(schemes)})"
    if result.requantized:
        line += (f"; requantized {len(result.requantized)} float8 weight(s) with new scales, keeping at least "
                 f"{min(result.requantized.values()):.1%} of the adapter's change")
    err.print(line)
