"""`loratool.convert` and `loratool.save`: write an adapter in any dialect loratool writes, exactly or not at all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..adapter import Adapter


def save(adapter: Adapter, path, *, to: str | None = None, overwrite: bool = False, inputs=(), **options) -> int:
    """Write an adapter, atomically, in the dialect `to` or the one its name says (io.registry.writer_for:
    ".safetensors" -> loratool, a folder -> peft, kohya with `to="kohya"`).

    Args:
        adapter: the adapter (numpy or torch factors).
        path: the file or folder to write.
        to: "loratool", "peft" or "kohya"; None picks from the name.
        overwrite: replace `path` if it exists.
        inputs: paths the output must not be, contain or sit inside (the files the adapter was read from).
        options: writer options (kohya's `prefix`, PEFT's `base_model_name_or_path`); each writer takes its own.
    Returns:
        The bytes written.
    Raises:
        UsageError: the name does not fit the dialect (or no dialect writes it).
        FileError: the output exists without `overwrite`, or is an input.
        UnsupportedError: the dialect cannot hold the adapter exactly (the message says which target and why).
        NumericError: a factor is not finite.
    """
    return _write(adapter, path, to=to, overwrite=overwrite, inputs=inputs, **options)[1]


def _write(adapter: Adapter, path, *, to=None, overwrite=False, inputs=(), **options) -> tuple[str, int]:
    """(dialect written, bytes written): `save`, for the tasks that report their size."""
    from ..fsutil import check_output
    from ..io import registry

    writer = registry.writer_for(path, to)
    check_output(path, [p for p in inputs if p is not None], overwrite)
    nbytes = writer.write(adapter, path, overwrite=overwrite, **options)
    return writer.name, nbytes


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the adapter as read (numpy factors), the dialects read and written, bytes written."""

    adapter: Adapter
    dialect: str
    to: str
    bytes: int
    output: str = ""
    excluded: list = field(default_factory=list)  # targets left out by `targets`/`exclude`


def convert(path, output, *, to: str | None = None, overwrite: bool = False, kohya_prefix: str = "lora_unet_",
            revision: str | None = None, targets=(), exclude=(), **options) -> ConvertResult:
    """Read an adapter of any dialect and write it in another without changing ΔW, exactly or not at all.

    Args:
        path: the adapter (file or PEFT folder), or a PEFT adapter's Hugging Face Hub id (`org/name[@REV]`).
        output: the file or folder to write; with `to` None its name picks the dialect
            (io.registry.writer_for: ".safetensors" -> loratool, a folder -> peft).
        to: the dialect to write ("loratool", "peft", "kohya"), or None.
        overwrite: replace `output` if it exists.
        kohya_prefix: kohya only: the name prefix of targets not read from kohya.
        revision: the Hub revision of a Hub id (path or base) given without its own `@REV`.
        targets, exclude: fnmatch globs selecting the targets written (tasks._inputs.select_targets); the
            others are listed in the result's `excluded`.
        options: reader options (base (a path or Hub id), allow_unknown, allow_partial (modules that map to
            no base key are skipped and listed in the adapter's info["skipped"]), alpha, r, enable_lora,
            fan_in_fan_out).
    Returns:
        A ConvertResult.
    Raises:
        UsageError: `output`'s name is not one the chosen dialect is written to; a `targets` glob matches
            nothing, or the selection leaves no target.
        FileError: `output` is an input, or exists without `overwrite`.
        MismatchError: kohya names without a base cannot become dotted keys.
        UnsupportedError: the conversion cannot be exact (the message says which target and why).
        SpecError, NumericError: as the reader or writer says.
    """
    from ..errors import MismatchError
    from ..fsutil import check_output
    from ..io import registry
    from ..io.base import task_type_of
    from ._inputs import hub_inputs, select_targets

    writer = registry.writer_for(output, to)
    given_base = options.get("base")
    base, (local,) = hub_inputs(given_base, [path], revision)
    if base is not None:
        options["base"] = base
    check_output(output, [local, base], overwrite)
    src = registry.Source(local)
    d = registry.detect(src)
    adapter = registry.load(src, dialect=d, **options)
    if not len(adapter) and adapter.info.get("skipped"):
        raise MismatchError(f"{path}: no module maps to the base ({len(adapter.info['skipped'])} skipped under "
                            f"--allow-partial, the first: {adapter.info['skipped'][0]}); nothing was written")
    (adapter,), excluded = select_targets([adapter], [os.fspath(path)], targets, exclude)
    if adapter.info.get("kohya_unmapped") and writer.name != d.name:
        raise MismatchError(f"{path}: kohya names such as \"{next(iter(adapter.targets))}\" cannot be turned back "
                            "into dotted module paths without the model; pass --base")
    # PEFT output names its base (as given: a Hub id stays one) and task, so AutoPeftModelFor* loads it (kept
    # from a PEFT input otherwise).
    named = ({"base_model_name_or_path": os.fspath(given_base), "task_type": task_type_of(base)}
             if isinstance(base, (str, os.PathLike)) else {})
    nbytes = writer.write(adapter, output, overwrite=overwrite, prefix=kohya_prefix, **named)
    return ConvertResult(adapter=adapter, dialect=d.name, to=writer.name, bytes=nbytes, output=os.fspath(output),
                         excluded=excluded)


__all__ = ["save", "convert", "ConvertResult"]
