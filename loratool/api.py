"""Library entry points behind `validate`, `inspect` and `extract`: plain data in, plain data out, no printing."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING
from dataclasses import replace

from .adapter import Adapter
from .validation import Report, check_base, check_values, validate_header

if TYPE_CHECKING:
    from .ops.extract import ExtractResult


def validate_file(path, base=None, read_data: bool = True) -> Report:
    """Every rule of the spec on a native adapter file; with `base`, rules B001-B004 too.

    Args:
        path: the adapter file.
        base: a base model path (file or folder) or an opened io.base.BaseModel, or None.
        read_data: also read the factors for rules T006 and W003 (imports torch).
    Returns:
        A Report; `report.errors` is empty when the file is valid.
    """
    rep = validate_header(path)
    if rep.adapter is None or rep.errors:
        return rep
    if read_data:
        from .container import read_tensor

        class _OnDemand:
            """name -> tensor read when asked: validation holds one tensor at a time, whatever the file size."""

            def __init__(self, fd, header):
                self.fd, self.header = fd, header

            def get(self, name):
                info = self.header.tensors.get(name)
                return None if info is None else read_tensor(self.fd, self.header.data_start, info)

        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            rep.findings += check_values(_OnDemand(fd, rep.header), rep.adapter)
        finally:
            os.close(fd)
    if base is not None:
        from .io.base import BaseModel, open_base

        b = base if isinstance(base, BaseModel) else open_base(base)
        try:
            rep.findings += check_base(rep.adapter, b)
        finally:
            if b is not base:
                b.close()
    return rep


def summary(adapter: Adapter, header=None) -> dict:
    """Header-level summary of an adapter (factors not needed): counts, ranks, alphas, scales, dtypes."""
    ranks, alphas, scales, layouts = Counter(), Counter(), Counter(), Counter()
    dtypes = Counter()
    rows = []
    for t in adapter:
        layouts[t.layout] += 1
        for b in t.blocks:
            alphas[b.alpha] += 1
            scales[round(b.scale, 12)] += 1
        ranks[t.rank] += 1
        row = {
            "target": t.key, "kind": t.kind, "layout": t.layout, "shape": list(t.shape), "rank": t.rank,
            "blocks": [{"rank": b.rank, "alpha": b.alpha, "scale": b.scale, "scale_rule": b.scale_rule,
                        "rows": list(b.rows), "cols": list(b.cols)} for b in t.blocks],
        }
        if t.kind == "full":
            row["scale"] = t.delta_scale
        if t.dtype or t.sha256:
            row["fingerprint"] = {"dtype": t.dtype, "sha256": t.sha256}
        if t.info:
            row["info"] = dict(t.info)
        rows.append(row)
    out = {
        "targets": len(adapter),
        "parameters": adapter.n_params,
        "rank_histogram": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {repr(k): v for k, v in sorted(alphas.items())},
        "scales": {repr(k): v for k, v in sorted(scales.items())},
        "layouts": dict(sorted(layouts.items())),
        "fingerprint": {
            "dtypes": sum(1 for t in adapter if t.dtype),
            "sha256": sum(1 for t in adapter if t.sha256),
        },
        "metadata": dict(adapter.metadata),
        "info": dict(adapter.info),
        "per_target": rows,
    }
    if header is not None:
        for info in header.tensors.values():
            dtypes[info.dtype] += 1
        out["dtypes"] = dict(sorted(dtypes.items()))
        out["bytes"] = header.file_size
    return out


def target_stats(adapter: Adapter) -> dict[str, dict]:
    """Per target ||ΔW||_F, ranks for 90% and 99% of the energy and non-finite counts, from the factors.

    Args:
        adapter: an adapter with its factors loaded (numpy arrays or torch tensors).
    Returns:
        key -> {"norm", "rank90", "rank99", "nonfinite"}; the first three are None for a target with
        non-finite values.
    """
    import numpy as np

    from .ops.linalg import energy_rank, frobenius_norm, numpy_factors, singular_values

    out = {}
    for t in numpy_factors(adapter):
        tensors = [t.delta] if t.kind == "full" else [x for b in t.blocks for x in (b.A, b.B)]
        nonfinite = sum(int(x.size - np.count_nonzero(np.isfinite(x))) for x in tensors)
        if nonfinite:
            out[t.key] = {"norm": None, "rank90": None, "rank99": None, "nonfinite": nonfinite}
            continue
        S = singular_values(t)
        out[t.key] = {"norm": frobenius_norm(t), "rank90": energy_rank(S, 0.90), "rank99": energy_rank(S, 0.99),
                      "nonfinite": 0}
    return out


# ---- extract -------------------------------------------------------------------------------------------------

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


def _for_writers(adapter: Adapter) -> Adapter:
    """The adapter with its numpy factors tagged as hostarray.HostTensors, the form io's writers take today.
    Remove once the writers take plain numpy arrays (issue 11)."""
    from dataclasses import replace

    from .dtypes import dtype_of
    from .hostarray import HostTensor

    def tag(x):
        name = dtype_of(x)
        return HostTensor(x.view("u2") if name == "BF16" else x, name)

    targets = [replace(t, delta=tag(t.delta)) if t.kind == "full" else
               t.with_blocks(replace(b, A=tag(b.A), B=tag(b.B)) for b in t.blocks) for t in adapter]
    return adapter.replace_targets(targets)


def extract_files(finetuned, base, *, output=None, to: str = "loratool", rank: int | None = None,
                  energy: float | None = None, threshold: float | None = None, max_params: int | None = None,
                  targets=(), fan_in_fan_out=None, embeddings: bool = False, keep_full: bool = False,
                  device: str = "cpu", dtype: str | None = None, clamp_quantile: float | None = None, seed: int = 0,
                  oversample: int | None = None, power_iterations: int | None = None, overwrite: bool = False,
                  progress=None) -> ExtractResult:
    """Extract a LoRA adapter from a finetuned model and its base, and write it (ops/extract.py has the method).

    Args:
        finetuned, base: paths of the two models: .safetensors files, Hugging Face folders (sharded or not) or
            .pt/.pth/.bin state dicts, in any combination.
        output: the file (a folder for PEFT) to write; None names it FINETUNED-minus-BASE-<rule> in the current
            folder (`default_extract_output`).
        to: "loratool", "peft" or "kohya".
        rank, energy, threshold, max_params: the rank rule, exactly one (rank may cap max_params).
        targets: globs of the tensor keys to consider (default: all).
        fan_in_fan_out: globs of 2-D weights stored (in, out); None reads the hint of a folder's config.json
            (GPT-2 Conv1D).
        embeddings, keep_full: factorise embeddings; store changed vectors (and unfactorised embeddings) whole.
        device: "cpu" or "cuda" (loratool.device). dtype: "float32" (None), "bfloat16" or "float16".
        clamp_quantile, seed, oversample, power_iterations: see ops.extract.ExtractOptions.
        overwrite: replace an existing output.
        progress: called with advance=0, total=<tensor pairs>, then advance=1 per pair.
    Returns:
        ops.extract.ExtractResult, with `output` and `bytes` (written) set.
    Raises:
        ValueError: no rank rule or more than one.
        FileError: an input is missing, or the output exists (without `overwrite`) or is an input.
        SpecError: an input is not a model loratool can read.
        MismatchError: the models do not pair up.
        NumericError: a difference is not finite, factors overflow `dtype`, or nothing changed enough to write.
        UnsupportedError: the device is not available, or the output dialect cannot hold the adapter.
    """
    from .errors import NumericError
    from .fsutil import check_output
    from .io.base import open_base
    from .ops.extract import ExtractOptions, extract, model_hints

    opts = ExtractOptions(rank=rank, energy=energy, threshold=threshold, max_params=max_params,
                          targets=tuple(targets),
                          fan_in_fan_out=model_hints(finetuned, base) if fan_in_fan_out is None else tuple(fan_in_fan_out),
                          embeddings=embeddings, keep_full=keep_full, clamp_quantile=clamp_quantile,
                          dtype=dtype or "float32", seed=seed, oversample=oversample,
                          power_iterations=power_iterations, device=device)
    opts.check()
    if to not in ("loratool", "peft", "kohya"):
        raise ValueError(f"to={to!r} is not one of loratool, peft, kohya")
    out = Path(output) if output is not None else default_extract_output(finetuned, base, rank, energy, threshold,
                                                                          max_params, to)
    ft_model = open_base(finetuned)
    try:
        base_model = open_base(base)
    except BaseException:
        ft_model.close()
        raise
    with ft_model, base_model:
        check_output(out, [*ft_model.files, *base_model.files], overwrite)
        result = extract(ft_model, base_model, opts, names=(str(finetuned), str(base)), progress=progress)
    if not result.adapter.targets:
        raise NumericError(f"{finetuned}: no target to write: {result.unchanged} tensors are unchanged and "
                           f"{len(result.not_extracted)} changed ones were not factorised; nothing was written")
    adapter = _for_writers(result.adapter)
    if to == "loratool":
        from .io.native import save

        result.bytes = save(adapter, out)
    elif to == "peft":
        from .io.peft import save

        result.bytes = save(adapter, out, overwrite=overwrite, base_model_name_or_path=str(base))
    else:
        from .io.kohya import save

        result.bytes = save(adapter, out)
    result.output = out
    return result
# ---- rescale and combine: paths or in-memory adapters in, result objects out -----------------------------

def _set(options: dict) -> list[str]:
    """The reader options given a value (`flags` only names them in messages)."""
    return sorted(k for k, v in options.items() if k != "flags" and v not in (None, False, (), []))


def _adapter(adapter_or_path, reader_options: dict) -> Adapter:
    if isinstance(adapter_or_path, Adapter):
        if _set(reader_options):
            raise ValueError(f"reader options {', '.join(_set(reader_options))} apply to paths, not to an "
                             "in-memory Adapter")
        return adapter_or_path
    from .io.detect import load_adapter

    return load_adapter(adapter_or_path, **reader_options)


def unused_reader_options(paths, reader_options: dict) -> list[str]:
    """The reader options that are set but taken by no dialect of `paths` (adapter files or folders)."""
    from .io.detect import accepted_options, detect

    taken = set().union(*(accepted_options(detect(p)) for p in paths))
    return [k for k in _set(reader_options) if k not in taken]


def rescale(adapter_or_path, *, scale: float | None = None, alpha: float | None = None, rank: int | None = None,
            energy: float | None = None, progress=None, **reader_options):
    """Rescale an adapter: its strength exactly (scale, alpha) or its rank optimally (rank, energy).

    Give exactly one of scale, alpha, rank and energy; ops/rescale.py says what each does. Nothing is
    written: save `result.adapter` with `save`.

    Args:
        adapter_or_path: an in-memory Adapter, or the path of an adapter of any dialect loratool reads.
        scale: ΔW' = scale · ΔW exactly. alpha: every block's alpha set to this value.
        rank: at most this many singular values per block group. energy: the fewest that keep this fraction.
        progress: optional callable progress(advance, total=None), called per target.
        reader_options: for a path, the options of io.detect.load_adapter (base, allow_unknown, and loralib's
            r, enable_lora, fan_in_fan_out; flags names an option's command-line flag in messages). loralib's
            alpha is `lora_alpha` here, since `alpha` is the new alpha.
    Returns:
        ops.rescale.RescaleResult: the adapter (factors as numpy arrays) and its report (`report()`).
    Raises:
        ValueError: not exactly one of scale, alpha, rank, energy (a programming error).
        SpecError, FileError, UnsupportedError: the path cannot be read.
        NumericError, UnsupportedError: as ops.rescale says.
    """
    from .ops.rescale import rescale as run

    if "lora_alpha" in reader_options:
        reader_options["alpha"] = reader_options.pop("lora_alpha")
    adapter = _adapter(adapter_or_path, reader_options)
    return run(adapter, scale=scale, alpha=alpha, rank=rank, energy=energy, progress=progress)


def combine(adapters_or_paths, *, weights=None, method: str = "concat", rank: int | None = None,
            density: float | None = None, seed: int = 0, progress=None, **reader_options):
    """Combine adapters into one over the union of their targets: Σ w_i ΔW_i exactly, or compressed.

    The methods (concat, svd, ties, dare) and their parameters are registered in ops.combine_methods.METHODS.
    Nothing is written: save `result.adapter` with `save`.

    Args:
        adapters_or_paths: in-memory Adapters and/or paths of adapters of any dialect, in order.
        weights: one finite weight per adapter (default all 1; negative allowed).
        method: the name of a registered method. rank, density, seed: its parameters.
        progress: optional callable progress(advance, total=None), called per target.
        reader_options: for the paths, the options of io.detect.load_adapter; each set option must be
            taken by the dialect of at least one path.
    Returns:
        ops.combine.CombineResult: the adapter (factors as numpy arrays) and its report (`report()`).
    Raises:
        UnsupportedError: a set reader option is taken by no input's dialect.
        MismatchError: a target differs in kind, layout, shape or base fingerprint between inputs.
        NumericError: a weight, rank or density is out of range, or a result is not finite.
        ValueError: the arguments do not fit together (a programming error).
    """
    from .container import escape
    from .io.detect import detect, load_adapter
    from .ops.combine import combine as run

    items = list(adapters_or_paths)
    paths = [x for x in items if not isinstance(x, Adapter)]
    unused = unused_reader_options(paths, reader_options) if paths else _set(reader_options)
    if unused:
        from .errors import UnsupportedError

        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UnsupportedError(f"no input is of a dialect that takes {flags}; drop the option")
    adapters, names = [], []
    for i, x in enumerate(items):
        if isinstance(x, Adapter):
            adapters.append(x)
            names.append(f"adapter {i + 1}")
        else:
            adapters.append(load_adapter(x, dialect=detect(x), strict=False, **reader_options))
            names.append(escape(str(x)))
    return run(adapters, weights=weights, method=method, rank=rank, density=density, seed=seed, names=names,
               progress=progress)


def save(adapter: Adapter, path) -> int:
    """Write an adapter in the native format, atomically and deterministically. Returns the bytes written.

    Raises:
        NumericError: a factor or delta is not finite (nothing is written).
        FileError: the path cannot be written.
    """
    from .dtypes import is_torch, to_torch
    from .io.native import save as write

    # io.native.save takes torch tensors (and arrays tagged with `st_dtype`): hand it plain numpy factors as
    # tensors over the same memory (a copy of a read-only array, which torch.from_numpy would warn about).
    def tensor(x):
        if x is None or is_torch(x) or hasattr(x, "st_dtype"):
            return x
        return to_torch(x if x.flags.writeable else x.copy())

    targets = []
    for t in adapter:
        if t.kind == "full":
            targets.append(replace(t, delta=tensor(t.delta)))
        else:
            targets.append(t.with_blocks(replace(b, A=tensor(b.A), B=tensor(b.B)) for b in t.blocks))
    return write(adapter.replace_targets(targets), path)
