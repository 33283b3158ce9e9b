"""Dialect detection and the one entry point every command uses to read an adapter.

`detect` looks only at file names and headers (no torch). `load_adapter` dispatches to the dialect's
module, each of which exposes `load(path, **options) -> Adapter`.
"""

from __future__ import annotations

import importlib

from .. import spec
from ..container import read_header
from ..errors import SpecError, UnsupportedError
from ._common import require_dir_or_file
from .base import TORCH_SUFFIXES

# dialect name -> module implementing load(path, **options)
DIALECTS = {
    "loratool": "loratool.io.native",
    "peft": "loratool.io.peft",
    "kohya": "loratool.io.kohya",
    "loralib": "loratool.io.loralib",
}


def detect(path) -> str:
    """Name the dialect of `path` from its name and header.

    Raises:
        FileError: the path does not exist.
        SpecError: nothing about the file says which dialect it is.
    """
    p = require_dir_or_file(path)
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return "peft"
        raise SpecError(f"{p}: folder has no adapter_config.json; pass the adapter file itself")
    if p.suffix == ".safetensors":
        hdr = read_header(p)
        if hdr.metadata.get(spec.KEY_FORMAT) is not None:
            return "loratool"
        names = hdr.tensors.keys()
        if any(".lora_down." in n or ".lora_up." in n or n.endswith(".alpha") for n in names) or \
                any(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")) for n in names):
            return "kohya"  # LyCORIS files share these prefixes; the kohya reader names and refuses them
        if any(".lora_A." in n or ".lora_B." in n or ".lora_embedding_A" in n for n in names):
            return "peft"
        return "loratool"  # let the native reader say precisely what is missing (rule M001)
    if p.suffix in TORCH_SUFFIXES:
        if (p.parent / "adapter_config.json").is_file():
            return "peft"  # adapter_model.bin of a PEFT folder
        return "loralib"
    raise SpecError(f"{p}: unknown adapter file type; expected .safetensors, .pt/.pth/.bin or a PEFT folder")


def accepted_options(dialect: str) -> set[str]:
    """The keyword options the dialect's reader takes."""
    import inspect

    return set(inspect.signature(importlib.import_module(DIALECTS[dialect]).load).parameters) - {"path"}


def load_adapter(path, *, dialect: str | None = None, strict: bool = True, flags: dict | None = None, **options):
    """Read an adapter of any supported dialect into the in-memory model.

    Args:
        path: a file or a PEFT folder.
        dialect: force a dialect instead of detecting it.
        options: dialect-specific options (for example `base` for kohya names, `alpha` for loralib).
        strict: refuse a set option the dialect does not take (False drops it: for commands reading several
            adapters of different dialects, which check that some input takes each option).
        flags: the command-line flag of an option where it is not "--" + its name (rescale's --lora-alpha),
            for the refusal's message.
    Raises:
        SpecError, FileError, UnsupportedError: as the dialect's reader says.
    """
    name = dialect or detect(path)
    if name not in DIALECTS:
        raise UnsupportedError(f"{path}: looks like a {name} adapter, which this version of loratool cannot read yet")
    # Options a dialect does not take are dropped when unset and refused when set, so that a flag such as
    # --alpha is never silently ignored for a dialect that keeps alpha in its file.
    accepted = accepted_options(name)
    extra = [k for k, v in options.items() if k not in accepted and v not in (None, False, (), [])]
    if extra and strict:
        named = ", ".join((flags or {}).get(k, "--" + k.replace("_", "-")) for k in sorted(extra))
        raise UnsupportedError(f"{path}: is a {name} adapter, which does not take {named}; drop the option")
    return importlib.import_module(DIALECTS[name]).load(path, **{k: v for k, v in options.items() if k in accepted})
