"""Dialect detection and the one entry point every command uses to read an adapter, by name: thin
wrappers over the registry (io/registry.py), kept because many callers use them.

`detect` looks only at file names, headers and configs (no torch). `load_adapter` reads with the
dialect's reader, which returns numpy factors.
"""

from __future__ import annotations

from . import registry
from .registry import accepted_options


def detect(path) -> str:
    """Name the dialect of `path` from its name and header.

    Raises:
        FileError: the path does not exist.
        SpecError: nothing about the file says which dialect it is.
    """
    return registry.detect(path).name


def load_adapter(path, *, dialect: str | None = None, strict: bool = True, flags: dict | None = None, **options):
    """Read an adapter of any supported dialect into the in-memory model (numpy factors).

    Args:
        path: a file or a PEFT folder.
        dialect: force a dialect instead of detecting it.
        options: dialect-specific options (for example `base` for kohya names, `alpha` for loralib).
        strict: refuse a set option the dialect does not take (False drops it: for commands reading several
            adapters of different dialects, which check that some input takes each option, and for callers
            that still pass `host=True`, which every reader now is).
        flags: the command-line flag of an option where it is not "--" + its name (rescale's --lora-alpha),
            for the refusal's message.
    Raises:
        SpecError, FileError, UnsupportedError: as the dialect's reader says.
    """
    return registry.load(path, dialect=dialect, strict=strict, flags=flags, **options)


__all__ = ["detect", "load_adapter", "accepted_options"]
