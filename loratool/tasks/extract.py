"""`loratool.extract`: an adapter from a finetuned model and its base, written in the dialect asked for."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..fsutil import maps_os_errors

if TYPE_CHECKING:
    from ..ops.extract import ExtractResult


def _stem(p) -> str:
    path = Path(p)
    if path.is_dir() or not path.suffix:
        name = path.resolve().name
    elif path.name in ("model.safetensors", "pytorch_model.bin"):
        name = path.resolve().parent.name
    else:
        name = path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def default_extract_output(finetuned, base, rank=None, energy=None, threshold=None, max_params=None,
                           to: str = "loratool") -> Path:
    """FINETUNED-minus-BASE-<rule> in the current folder (r16, e0.9, t0.01 or p1000000); a folder for PEFT."""
    rule = (f"p{max_params}" if max_params is not None else f"r{rank}" if rank is not None else
            f"e{energy:g}" if energy is not None else f"t{threshold:g}")
    name = f"{_stem(finetuned)}-minus-{_stem(base)}-{rule}"
    return Path(name if to == "peft" else name + ".safetensors")


@maps_os_errors("output")
def extract(finetuned, base, *, output=None, to: str | None = None, rank: int | None = None,
            energy: float | None = None, threshold: float | None = None, max_params: int | None = None,
            targets=(), fan_in_fan_out=None, embeddings: bool = False, keep_full: bool = False,
            device: str = "cpu", dtype: str | None = None, clamp_quantile: float | None = None, seed: int = 0,
            oversample: int | None = None, power_iterations: int | None = None, overwrite: bool = False,
            progress=None, revision: str | None = None) -> ExtractResult:
    """Extract a LoRA adapter from a finetuned model and its base, and write it (ops/extract.py has the method).

    Args:
        finetuned, base: paths of the two models: .safetensors files, Hugging Face folders (sharded or not) or
            .pt/.pth/.bin state dicts, in any combination, or Hugging Face Hub ids (`org/name[@REV]`, io.hub).
        output: the file (a folder for PEFT) to write; None names it FINETUNED-minus-BASE-<rule> in the current
            folder (`default_extract_output`).
        to: "loratool", "peft" or "kohya"; None picks from the output's name (`loratool.save`), loratool without
            one.
        rank, energy, threshold, max_params: the rank rule, exactly one (rank may cap max_params).
        targets: globs of the tensor keys to consider (default: all).
        fan_in_fan_out: globs of 2-D weights stored (in, out); None reads the hint of a folder's config.json
            (GPT-2 Conv1D).
        embeddings, keep_full: factorise embeddings; store changed vectors (and unfactorised embeddings) whole.
        device: "cpu" or "cuda" (loratool.device). dtype: "float32" (None), "bfloat16" or "float16".
        clamp_quantile, seed, oversample, power_iterations: see ops.extract.ExtractOptions.
        overwrite: replace an existing output.
        progress: called with advance=0, total=<tensor pairs>, then advance=1 per pair.
        revision: the Hub revision of the Hub ids given without their own `@REV`.
    Returns:
        ops.extract.ExtractResult, with `output` and `bytes` (written) set.
    Raises:
        ValueError: no rank rule or more than one.
        UsageError: the output's name does not fit the dialect.
        FileError: an input is missing, or the output exists (without `overwrite`) or is an input.
        SpecError: an input is not a model loratool can read.
        MismatchError: the models do not pair up.
        NumericError: a difference is not finite, factors overflow `dtype`, or nothing changed enough to write.
        UnsupportedError: the device is not available, or the output dialect cannot hold the adapter.
    """
    from ..errors import NumericError
    from ..fsutil import check_output
    from ..io.base import open_base, task_type_of
    from ..io.experts import fused_layouts
    from ..io.hub import resolve_all
    from ..io.registry import writer_for
    from ..ops.extract import ExtractOptions, extract as run, model_hints
    from ..ops.ties import count_tied_heads
    from ._inputs import quant_view
    from .convert import _write

    shown = (os.fspath(finetuned), os.fspath(base))
    ft_path, base_path = resolve_all([(finetuned, "base"), (base, "base")], revision)
    ffo = model_hints(ft_path, base_path) if fan_in_fan_out is None else tuple(fan_in_fan_out)
    opts = ExtractOptions(rank=rank, energy=energy, threshold=threshold, max_params=max_params,
                          targets=tuple(targets), fan_in_fan_out=ffo,
                          embeddings=embeddings, keep_full=keep_full, clamp_quantile=clamp_quantile,
                          dtype=dtype or "float32", seed=seed, oversample=oversample,
                          power_iterations=power_iterations, device=device)
    opts.check()
    out = Path(output) if output is not None else default_extract_output(finetuned, base, rank, energy, threshold,
                                                                          max_params, to or "loratool")
    to = writer_for(out, to).name  # a name the writer refuses is refused before any work
    ft_model = open_base(ft_path)
    try:
        base_model = open_base(base_path)
    except BaseException:
        ft_model.close()
        raise
    with ft_model, base_model:
        check_output(out, [ft_path, base_path, *ft_model.files, *base_model.files], overwrite)  # folders too
        # quantized models (FP8, bitsandbytes, GPTQ, AWQ, MXFP4) are paired dequantized in float32 (ops.quant)
        ft_q, base_q = quant_view(ft_model, ft_path), quant_view(base_model, base_path)
        ft_view, base_view, missed = _tied(ft_q, ft_path, base_q, base_path)
        # fused expert tensors (transformers 5 MoE) are factorised expert by expert, in the base's orientation
        opts = replace(opts, expert_layouts=fused_layouts(base_view))
        result = run(ft_view, base_view, opts, names=shown, progress=progress)
        ft_model.check_unchanged()  # a model written in place meanwhile would give factors of neither version
        base_model.check_unchanged()
    result.summary["ties"] = count_tied_heads(result, missed)
    if not result.adapter.targets:
        raise NumericError(f"{finetuned}: no target to write: {result.unchanged} tensors are unchanged and "
                           f"{len(result.not_extracted)} changed ones were not factorised; nothing was written")
    _, result.bytes = _write(result.adapter, out, to=to, overwrite=overwrite,
                             base_model_name_or_path=shown[1], task_type=task_type_of(base_path))
    result.output = out
    return result

def _tied(ft, ft_path, base, base_path):
    """The two models as extract pairs them, and the finetune's ties whose head neither stores.

    A tied head one model does not store but the other does is paired with the embedding's tensor (what
    transformers loads as that head: io.ties.HeadsView), so the adapter gets a head target relative to it. A
    head neither stores is not paired; the finetune's ties among those are returned, for count_tied_heads.
    """
    from ..io.ties import find_ties, with_heads

    ft_ties, base_ties = find_ties(ft, ft_path), find_ties(base, base_path)
    ft_view = with_heads(ft, [t for t in ft_ties if base.info(t.head) is not None])
    base_view = with_heads(base, [t for t in base_ties if ft.info(t.head) is not None])
    missed = [t for t in ft_ties if not t.head_stored and base.info(t.head) is None]
    return ft_view, base_view, missed


__all__ = ["extract", "default_extract_output"]
