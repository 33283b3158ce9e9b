"""`loratool convert`: read any supported dialect and write loratool, PEFT or kohya, exactly or not at all.

The dialects it reads and the `--to` choices come from the registry (io/registry.py).
"""

from __future__ import annotations

import click

from ..io.registry import writable
from .options import dialect_options, reader_options_of, selection_options


@click.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=True),
              help="Output: a .safetensors file (loratool, or kohya with --to kohya) or a folder (peft).")
@click.option("--to", "to", type=click.Choice(writable()),
              help="Dialect to write (default: from OUTPUT's name: .safetensors -> loratool, a folder -> peft).")
@dialect_options
@selection_options
@click.option("--kohya-prefix", default="lora_unet_", show_default=True,
              help="kohya only: prefix of names for targets that were not read from kohya (lora_unet_, lora_te_, "
                   "...).")
@click.option("--rank", type=int, default=None,
              help="Make LoHa, LoKr and LoCon-Tucker targets LoRA of this rank by the optimal truncation of their "
                   "exact ΔW (the error and the optimum are reported per target).")
@click.option("--energy", type=float, default=None,
              help="As --rank, keeping the fewest singular values that retain this fraction of ||ΔW||².")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--json", "json_", is_flag=True, help="Print one JSON document describing the conversion.")
@click.option("-q", "--quiet", is_flag=True, help="No summary line.")
def convert(path, output, to, targets, exclude, kohya_prefix, rank, energy, overwrite, json_, quiet, **reader):
    """Convert an adapter between dialects without changing ΔW.

    Reads loratool, PEFT folders, kohya/sd-scripts .safetensors and loralib .pt state dicts; writes loratool,
    PEFT (a folder PeftModel.from_pretrained loads) or kohya. Without --to, OUTPUT's name decides: a
    .safetensors file is loratool, a folder (a trailing /, or a name without a suffix) is PEFT; a name the
    chosen dialect cannot be written to is refused. Per-module ranks and alphas become PEFT's
    rank_pattern/alpha_pattern; rsLoRA is kept; kohya alphas are chosen so each module's strength is
    unchanged. A target with several blocks (an exact combine, row blocks of a fused qkv) becomes one A/B
    pair in PEFT and kohya: B = [s1·B1 | s2·B2 | ...] zero-padded to the blocks' rows, A = [A1; A2; ...], rank
    Σ r_i, exact. A conversion that cannot be exact (GPT-2 Conv1D to kohya, ...) is refused with the reason,
    and nothing is written. kohya names need --base to become dotted keys. PATH and --base may be Hugging Face
    Hub ids (org/name, with --revision); --targets/--exclude choose the targets written.

    Example:

        loratool convert peft_dir/ -o adapter.safetensors

        loratool convert lora.safetensors -o peft_out/ --to peft --base unet.safetensors

        loratool convert lora.pt -o adapter.safetensors --to loratool --alpha 16 --enable-lora 1,0,1 --fan-in-fan-out

        loratool convert sdxl_lora.safetensors -o unet_only/ --to peft --base unet.safetensors --allow-partial

        loratool convert loha.safetensors -o lora_out/ --to peft --base unet.safetensors --rank 16
    """
    from ..tasks.convert import convert as run

    if rank is not None and energy is not None:
        raise click.UsageError("pass --rank or --energy, not both")
    res = run(path, output, to=to, overwrite=overwrite, kohya_prefix=kohya_prefix, targets=targets, exclude=exclude,
              rank=rank, energy=energy, **reader_options_of(reader))
    adapter, dialect, to, nbytes = res.adapter, res.dialect, res.to, res.bytes
    doc = {"input": str(path), "dialect": dialect, "output": str(output), "to": to, "targets": len(adapter),
           "parameters": adapter.n_params, "bytes": nbytes, "folded": list(res.folded), "info": dict(adapter.info),
           "skipped": list(adapter.info.get("skipped", [])), "excluded": list(res.excluded),
           "converted": res.converted}
    if json_:
        from .render import emit_json

        emit_json(doc)
    elif not quiet:
        from .render import err, fmt_bytes

        err.print(f"{path} ({dialect}) -> {output} ({to}): {len(adapter)} targets, {adapter.n_params:,} parameters, "
                  f"{fmt_bytes(nbytes)}")
        for row in res.converted:
            err.print(f"{row['target']}: {row['kind']} -> LoRA rank {row['rank_after']}: relative error "
                      f"{row['relative_error']:.4g} (optimum {row['optimal_error']:.4g})")
        if res.folded:
            err.print(f"folded {len(res.folded)} target(s) with several blocks into one A/B pair each (exact; the "
                      "rank is the sum of the blocks' ranks)")
        for msg in doc["skipped"]:
            err.print(f"skipped: {msg}")
        if res.excluded:
            err.print(f"left out {len(res.excluded)} target(s) by --targets/--exclude: {', '.join(res.excluded)}")
        if adapter.info.get("unknown_keys"):
            from ..io._common import listing

            err.print(f"ignored {len(adapter.info['unknown_keys'])} unknown key(s) (--allow-unknown): "
                      f"{listing(adapter.info['unknown_keys'])}")
