"""loratool: read, check, rescale, combine, merge and extract LoRA adapters.

The public API is imported lazily so that `import loratool` (and the CLI's `--help`) never pays for torch:

    import loratool
    adapter = loratool.load("adapter.safetensors")      # any dialect; native, PEFT, kohya, loralib
    report = loratool.validate("adapter.safetensors")   # all findings, never raises on the first
    loratool.save(adapter, "copy.safetensors")          # native format, atomic, deterministic
    res = loratool.rescale("adapter.safetensors", rank=16)  # or combine([...], method="svd", rank=16)
    loratool.save(res.adapter, "r16.safetensors")       # res.report() is what the CLI prints
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Adapter": ("loratool.adapter", "Adapter"),
    "Target": ("loratool.adapter", "Target"),
    "Block": ("loratool.adapter", "Block"),
    "LoraToolError": ("loratool.errors", "LoraToolError"),
    "load": ("loratool.io.detect", "load_adapter"),
    "save": ("loratool.api", "save"),
    "open_base": ("loratool.io.base", "open_base"),
    "rescale": ("loratool.api", "rescale"),
    "combine": ("loratool.api", "combine"),
}


def validate(path, base=None):
    """Check a native adapter file against every rule of the spec; returns a validate.Report.

    Args:
        path: the adapter file.
        base: optional base model path (file or folder); adds rules B001-B004.
    """
    from .api import validate_file

    return validate_file(path, base=base)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


__all__ = ["__version__", "validate", *_LAZY]
