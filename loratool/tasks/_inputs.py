"""Reading the adapters a task was given, each with the reader options its dialect takes."""

from __future__ import annotations

from ..adapter import Adapter
from ..errors import UsageError


def load_adapters(paths, options: dict | None = None, base=None, lazy: bool = False) -> list:
    """Read several adapters of any dialects.

    Args:
        paths: adapter files or folders.
        options: reader options the user set (see `io.detect.load_adapter`); each is handed to the inputs whose
            dialect takes it.
        base: a base model the task has anyway (merge's BASE), handed to every reader that takes one.
        lazy: each target's factors are read when `Target.loaded()` asks for them (see `io.registry.load`).
    Raises:
        UsageError: an option the user set is taken by none of the inputs' dialects.
        SpecError, FileError, UnsupportedError: as the readers say.
    """
    from ..io.detect import accepted_options, detect, load_adapter

    options = options or {}
    options = {k: options[k] for k in set_options(options)}
    dialects = [detect(p) for p in paths]
    taken = set().union(*(accepted_options(d) for d in dialects))
    unused = sorted(k for k in options if k not in taken)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UsageError(f"no input is of a dialect that takes {flags}; drop the option")
    if base is not None:
        options["base"] = base
    return [load_adapter(p, dialect=d, strict=False, lazy=lazy, **options) for p, d in zip(paths, dialects)]


def check_weights(weights, n: int) -> None:
    """One weight per adapter, or none (each 1).

    Raises:
        UsageError: another count; refused before anything is read.
    """
    if weights is not None and len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} adapters; give one weight per adapter")


def set_options(options: dict) -> list[str]:
    """The reader options given a value (`flags` only names them in messages)."""
    return sorted(k for k, v in options.items() if k != "flags" and v not in (None, False, (), []))


def as_adapter(adapter_or_path, reader_options: dict) -> Adapter:
    """An in-memory Adapter as it is, or the adapter at a path read with `reader_options`."""
    if isinstance(adapter_or_path, Adapter):
        if set_options(reader_options):
            raise ValueError(f"reader options {', '.join(set_options(reader_options))} apply to paths, not to an "
                             "in-memory Adapter")
        return adapter_or_path
    from ..io.detect import load_adapter

    return load_adapter(adapter_or_path, **reader_options)
