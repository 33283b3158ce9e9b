"""`loratool.convert` and `loratool.save`: write an adapter in any dialect loratool writes, exactly or not at all."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..adapter import Adapter
from ..fsutil import maps_os_errors


@maps_os_errors("path")
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
    from ..fsutil import check_output, os_errors
    from ..io import registry

    writer = registry.writer_for(path, to)
    check_output(path, [p for p in inputs if p is not None], overwrite)
    with os_errors(path):  # names this output, even for a caller whose own output argument was None
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


@maps_os_errors("output")
def convert(path, output, *, to: str | None = None, overwrite: bool = False, kohya_prefix: str = "lora_unet_",
            **options) -> ConvertResult:
    """Read an adapter of any dialect and write it in another without changing ΔW, exactly or not at all.

    Args:
        path: the adapter (file or PEFT folder).
        output: the file or folder to write; with `to` None its name picks the dialect
            (io.registry.writer_for: ".safetensors" -> loratool, a folder -> peft).
        to: the dialect to write ("loratool", "peft", "kohya"), or None.
        overwrite: replace `output` if it exists.
        kohya_prefix: kohya only: the name prefix of targets not read from kohya.
        options: reader options (base, allow_unknown, alpha, r, enable_lora, fan_in_fan_out).
    Returns:
        A ConvertResult.
    Raises:
        UsageError: `output`'s name is not one the chosen dialect is written to.
        FileError: `output` is an input, or exists without `overwrite`.
        MismatchError: kohya names without a base cannot become dotted keys.
        UnsupportedError: the conversion cannot be exact (the message says which target and why).
        SpecError, NumericError: as the reader or writer says.
    """
    from ..errors import MismatchError
    from ..fsutil import check_output
    from ..io import registry
    from ..io.base import task_type_of

    writer = registry.writer_for(output, to)
    check_output(output, [path, options.get("base")], overwrite)
    src = registry.Source(path)
    d = registry.detect(src)
    adapter = registry.load(src, dialect=d, **options)
    if adapter.info.get("kohya_unmapped") and writer.name != d.name:
        raise MismatchError(f"{path}: kohya names such as \"{next(iter(adapter.targets))}\" cannot be turned back "
                            "into dotted module paths without the model; pass --base")
    base = options.get("base")
    # PEFT output names its base and task, so AutoPeftModelFor* loads it (kept from a PEFT input otherwise).
    named = ({"base_model_name_or_path": os.fspath(base), "task_type": task_type_of(base)}
             if isinstance(base, (str, os.PathLike)) else {})
    nbytes = writer.write(adapter, output, overwrite=overwrite, prefix=kohya_prefix, **named)
    return ConvertResult(adapter=adapter, dialect=d.name, to=writer.name, bytes=nbytes, output=os.fspath(output))


__all__ = ["save", "convert", "ConvertResult"]
