"""`loratool.combine`: several adapters as one, through the registry of combine methods."""

from __future__ import annotations

import os
from dataclasses import replace

from ..adapter import Adapter
from ..fsutil import maps_os_errors


@maps_os_errors("output")
def combine(adapters_or_paths, *, weights=None, method: str = "concat", rank: int | None = None,
            density: float | None = None, seed: int = 0, output=None, to: str | None = None,
            overwrite: bool = False, progress=None, revision: str | None = None, **reader_options):
    """Combine adapters into one over the union of their targets: Σ w_i ΔW_i exactly, or compressed.

    The methods (concat, svd, ties, dare) and their parameters are registered in ops.combine_methods.METHODS.

    Args:
        adapters_or_paths: in-memory Adapters and/or paths of adapters of any dialect (or PEFT adapters'
            Hugging Face Hub ids, `org/name[@REV]`), in order.
        weights: one finite weight per adapter (default all 1; negative allowed).
        method: the name of a registered method. rank, density, seed: its parameters.
        output: where to write the result (`save`: its name or `to` picks the dialect); None writes nothing.
        to, overwrite: as `save`.
        progress: optional callable progress(advance, total=None), called per target.
        revision: the Hub revision of the Hub ids (adapters or base) given without their own `@REV`.
        reader_options: for the paths, the options of `loratool.load`; each set option must be taken by the
            dialect of at least one path.
    Returns:
        ops.combine.CombineResult: the adapter (factors as numpy arrays), its report (`report()`), and where
        it was written (output, to, bytes).
    Raises:
        UsageError: a set reader option is taken by no input's dialect; a weight count that is not one per
            adapter; an output name the writer refuses.
        MismatchError: a target differs in kind, layout, shape or base fingerprint between inputs.
        NumericError: a weight, rank or density is out of range, or a result is not finite.
        FileError: the output exists (without overwrite) or is an input.
    """
    from ..container import escape
    from ..errors import UsageError
    from ..io.registry import writer_for
    from ..ops.combine import combine as run
    from ._inputs import check_weights, hub_inputs, load_adapters, set_options
    from .convert import _write

    items = list(adapters_or_paths)
    names = [f"adapter {i + 1}" if isinstance(x, Adapter) else escape(str(x)) for i, x in enumerate(items)]
    check_weights(weights, len(items))
    if output is not None:
        writer_for(output, to)  # a name the writer refuses is refused before any work
    base, items = hub_inputs(reader_options.get("base"), items, revision)
    if base is not None:
        reader_options["base"] = base
    paths = [x for x in items if not isinstance(x, Adapter)]
    if not paths and set_options(reader_options):
        raise UsageError(f"reader options {', '.join(set_options(reader_options))} apply to paths, not to in-memory "
                         "adapters")
    loaded = iter(load_adapters(paths, reader_options) if paths else [])
    adapters = [x if isinstance(x, Adapter) else next(loaded) for x in items]
    result = run(adapters, weights=weights, method=method, rank=rank, density=density, seed=seed, names=names,
                 progress=progress)
    if any(a.info.get("kohya_unmapped") for a in adapters):  # kohya names as keys: only kohya writes them back
        result.adapter = replace(result.adapter, info={**dict(result.adapter.info), "kohya_unmapped": True})
    if output is not None:
        result.to, result.bytes = _write(result.adapter, output, to=to, overwrite=overwrite,
                                         inputs=[*paths, reader_options.get("base")])
        result.output = os.fspath(output)
    return result


__all__ = ["combine"]
