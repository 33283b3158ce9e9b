"""`loratool.rescale`: an adapter's strength exactly, or its rank optimally."""

from __future__ import annotations

import os

from ..fsutil import maps_os_errors


@maps_os_errors("output")
def rescale(adapter_or_path, *, scale: float | None = None, alpha: float | None = None, rank: int | None = None,
            energy: float | None = None, output=None, to: str | None = None, overwrite: bool = False,
            progress=None, revision: str | None = None, **reader_options):
    """Rescale an adapter: its strength exactly (scale, alpha) or its rank optimally (rank, energy).

    Give exactly one of scale, alpha, rank and energy; ops/rescale.py says what each does.

    Args:
        adapter_or_path: an in-memory Adapter, or the path of an adapter of any dialect loratool reads (or a
            PEFT adapter's Hugging Face Hub id, `org/name[@REV]`).
        scale: ΔW' = scale · ΔW exactly. alpha: every block's alpha set to this value.
        rank: at most this many singular values per block group. energy: the fewest that keep this fraction.
        output: where to write the result (`save`: its name or `to` picks the dialect); None writes nothing.
        to, overwrite: as `save`.
        progress: optional callable progress(advance, total=None), called per target.
        revision: the Hub revision of a Hub id (adapter or base) given without its own `@REV`.
        reader_options: for a path, the options of `loratool.load` (base, allow_unknown, and loralib's
            r, enable_lora, fan_in_fan_out; flags names an option's command-line flag in messages). loralib's
            alpha is `lora_alpha` here, since `alpha` is the new alpha.
    Returns:
        ops.rescale.RescaleResult: the adapter (factors as numpy arrays), its report (`report()`), and where
        it was written (output, to, bytes).
    Raises:
        ValueError: not exactly one of scale, alpha, rank, energy (a programming error).
        UsageError, FileError: the output's name does not fit the dialect, exists, or is an input.
        SpecError, FileError, UnsupportedError: the path cannot be read.
        NumericError, UnsupportedError: as ops.rescale and the writer say.
    """
    from ..io.registry import writer_for
    from ..ops.rescale import rescale as run
    from ._inputs import as_adapter, hub_inputs
    from .convert import _write

    if "lora_alpha" in reader_options:
        reader_options["alpha"] = reader_options.pop("lora_alpha")
    if output is not None:
        writer_for(output, to)  # a name the writer refuses is refused before any work
    base, (adapter_or_path,) = hub_inputs(reader_options.get("base"), [adapter_or_path], revision)
    if base is not None:
        reader_options["base"] = base
    adapter = as_adapter(adapter_or_path, reader_options)
    result = run(adapter, scale=scale, alpha=alpha, rank=rank, energy=energy, progress=progress)
    if output is not None:
        inputs = [] if not isinstance(adapter_or_path, (str, os.PathLike)) else [adapter_or_path]
        result.to, result.bytes = _write(result.adapter, output, to=to, overwrite=overwrite,
                                         inputs=[*inputs, reader_options.get("base")])
        result.output = os.fspath(output)
    return result


__all__ = ["rescale"]
