"""The registry of adapter dialects: each dialect module declares one `Dialect` (io/_common.py) and this is
the one place they are listed. Detection, reading (whole or structure only), the options each reader takes,
the writer of an output and the CLI's `--to` choices all come from here; nothing else names a dialect.

    d = detect("peft_dir/")                         # -> the peft Dialect
    a = structure("peft_dir/")                      # targets, shapes, ranks, alphas; no tensor read
    a = load("lora.pt", alpha=16)                   # numpy factors
    writer_for("out/").write(a, "out/")             # a PEFT folder, chosen by the output name

Importing this module imports no numpy and no torch (each dialect imports them where it reads or writes).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpecError, UnsupportedError, UsageError
from . import comfy, diffusers, gguf_lora, kohya, loralib, mlx, native, peft
from ._common import Dialect, Source, as_source, require_dir_or_file

# Registry order breaks detection ties and picks the default writer of a suffix (loratool for .safetensors).
DIALECTS: tuple[Dialect, ...] = (native.DIALECT, peft.DIALECT, kohya.DIALECT, loralib.DIALECT, diffusers.DIALECT,
                                  comfy.DIALECT, mlx.DIALECT, gguf_lora.DIALECT)
_BY_NAME = {d.name: d for d in DIALECTS}


def names() -> list[str]:
    """Every dialect's name, in registry order."""
    return [d.name for d in DIALECTS]


def writable() -> list[str]:
    """The names of the dialects loratool writes (the choices of `--to`), in registry order."""
    return [d.name for d in DIALECTS if d.save is not None]


def get(name: str) -> Dialect:
    """The dialect called `name`.

    Raises:
        UnsupportedError: no dialect has that name.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedError(f"\"{name}\" is not a dialect loratool knows; it knows {', '.join(names())}") \
            from None


def detect(path) -> Dialect:
    """The dialect of `path` (file, PEFT folder, or a Source), from names, headers and configs alone.

    Raises:
        FileError: the path does not exist.
        SpecError: nothing about the path says which dialect it is (or its safetensors header is unreadable).
    """
    src = as_source(path)
    p = require_dir_or_file(src.path)
    best, score = None, 0
    for d in DIALECTS:
        s = d.detect(src)
        if s > score:
            best, score = d, s
    if best is not None:
        return best
    if p.is_dir():
        raise SpecError(f"{p}: folder has no adapter_config.json; pass the adapter file itself")
    suffixes = sorted({s for d in DIALECTS for s in d.reads}, key=lambda s: (s != ".safetensors", s))
    raise SpecError(f"{p}: unknown adapter file type; expected {', '.join(suffixes)} or a PEFT folder")


def accepted_options(dialect) -> set[str]:
    """The keyword options the dialect's reader takes (a Dialect or its name)."""
    return set((get(dialect) if isinstance(dialect, str) else dialect).options)


def _resolve(path, dialect, strict: bool, flags, options) -> tuple[Source, Dialect, dict]:
    src = as_source(path)
    d = detect(src) if dialect is None else (get(dialect) if isinstance(dialect, str) else dialect)
    # Options a dialect does not take are dropped when unset and refused when set, so that a flag such as
    # --alpha is never silently ignored for a dialect that keeps alpha in its file. A usage mistake (exit 2), as
    # the same flag is for a command reading several adapters (tasks._inputs.load_adapters).
    extra = [k for k, v in options.items() if k not in d.options and v not in (None, False, (), [])]
    if extra and strict:
        named = ", ".join((flags or {}).get(k, "--" + k.replace("_", "-")) for k in sorted(extra))
        raise UsageError(f"{src.path}: is a {d.name} adapter, which does not take {named}; drop the option")
    return src, d, {k: v for k, v in options.items() if k in d.options}


def taken_options(path, dialect=None, **options) -> tuple[Dialect, dict]:
    """The dialect of `path` (detected unless given) and the options of `options` its reader takes.

    Raises:
        UsageError: an option is set that the dialect does not take.
        FileError, SpecError: as `detect`.
    """
    _, d, opts = _resolve(path, dialect, True, None, options)
    return d, opts


def load(path, *, dialect=None, strict: bool = True, flags: dict | None = None, lazy: bool = False, **options):
    """Read an adapter of any dialect with its tensors (numpy arrays).

    Args:
        path: a file, a PEFT folder, or a Source of either.
        dialect: force a dialect (name or Dialect) instead of detecting it.
        strict: refuse a set option the dialect does not take (False drops it: for commands reading several
            adapters of different dialects, which check that some input takes each option).
        flags: the command-line flag of an option where it is not "--" + its name (rescale's --lora-alpha),
            for the refusal's message.
        lazy: read each target's factors only when `Target.loaded()` asks for them (merge reads one target at
            a time this way); a safetensors file is read per target, a torch file (.pt, .bin) whole.
        options: dialect-specific options (for example `base` for kohya names, `alpha` for loralib).
    Raises:
        UsageError: `strict` and a set option the dialect does not take.
        SpecError, FileError, MismatchError, UnsupportedError: as the dialect's reader says (with `lazy`, a
        file's refusals of its factors' values, or a file changed since, come from `Target.loaded()`).
    """
    src, d, opts = _resolve(path, dialect, strict, flags, options)
    return d.load(src, lazy=True, **opts) if lazy else d.load(src, **opts)


def structure(path, *, dialect=None, strict: bool = True, flags: dict | None = None, partial: bool = False,
              **options):
    """Read an adapter's structure (targets, shapes, ranks, alphas, layouts, blocks; every factor None). For
    safetensors-based dialects this reads headers and configs only and never imports torch.

    Args:
        partial: for a dialect that can (Dialect.structure_options), describe what the file alone says where
            `load` would refuse: a PEFT weights file without adapter_config.json, a loralib file without
            alpha. Every block's alpha is then NaN and info["alpha_unknown"] says what is missing.
        path, dialect, strict, flags, options: as `load`.
    Raises:
        As `load`.
    """
    src, d, opts = _resolve(path, dialect, strict, flags, options)
    if partial and "partial" in d.structure_options:
        opts["partial"] = True
    return d.structure(src, **opts)


# A name with one of these suffixes is a file, never a folder, whatever the command writes.
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf", ".json", ".npz", ".onnx")


def _kinds(dialects) -> str:
    """"a .safetensors file (loratool, kohya) or a folder (peft)": what the dialects write, grouped."""
    groups: dict[str, list[str]] = {}
    for d in dialects:
        groups.setdefault("a folder" if d.writes == "folder" else f"a {d.suffix} file", []).append(d.name)
    return " or ".join(f"{what} ({', '.join(names)})" for what, names in groups.items())


def writer_for(output, to: str | None = None, *, choices=None) -> Dialect:
    """The dialect an adapter output is written in, chosen once for every command: `to` when given (it must
    fit the name), else from the name: a file suffix picks the first dialect in registry order that writes it
    (".safetensors" -> loratool), a folder (a trailing "/", an existing folder, or a name without a suffix)
    picks the dialect that writes folders (peft).

    Args:
        output: the -o path.
        to: the dialect asked for (`--to`), or None.
        choices: the names of the dialects the command can write (default: every dialect with a writer).
    Raises:
        UsageError: the command cannot write that name (or `to` into it); one line naming what it writes.
    """
    allowed = [d for d in DIALECTS if d.save is not None and (choices is None or d.name in choices)]
    shown = os.fspath(output)
    p = Path(shown)
    folder = shown.endswith(("/", os.sep)) or p.is_dir() or (p.suffix == "" and p.name not in ("", "."))
    kinds = _kinds(allowed)
    if to is not None:
        d = get(to)
        if d not in allowed:
            raise UsageError(f"--to {to}: this command writes {kinds}; choose one of "
                             f"{', '.join(x.name for x in allowed)}")
        if d.writes == "folder" and p.suffix in FILE_SUFFIXES and not shown.endswith(("/", os.sep)):
            raise UsageError(f"--to {to} writes a folder (adapter_config.json + adapter_model.safetensors); give -o "
                             f"a folder name, not {p.name}")
        if d.writes == "file" and (p.suffix != d.suffix or shown.endswith(("/", os.sep))):
            raise UsageError(f"--to {to} writes one {d.suffix} file; give -o a name ending in {d.suffix}")
        return d
    for d in allowed:
        if (d.writes == "folder" and folder) or (d.writes == "file" and not folder and p.suffix == d.suffix):
            return d
    what = "a folder" if folder else (f"a {p.suffix} file" if p.suffix else "that name")
    raise UsageError(f"{shown}: this command cannot write {what}; it writes {kinds}: choose -o accordingly"
                     + (" or pass --to" if len(allowed) > 1 else ""))


__all__ = ["DIALECTS", "Dialect", "Source", "names", "writable", "get", "detect", "accepted_options", "taken_options",
           "load", "structure", "writer_for", "FILE_SUFFIXES"]
