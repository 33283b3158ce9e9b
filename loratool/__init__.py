"""loratool: validate, inspect, convert, rescale, combine, merge and extract LoRA adapters.

Every command of the CLI is one function here, taking paths or in-memory objects and returning a result the
CLI renders. The names are imported lazily, so `import loratool` (and the CLI's `--help`) pays for neither
numpy nor torch:

    import loratool
    adapter = loratool.load("adapter.safetensors")        # any dialect -> Adapter (numpy factors)
    report = loratool.validate("adapter.safetensors")     # all findings, never raises on the first
    issues = loratool.check_runtime("peft_dir/", "vllm")  # what vLLM refuses or applies differently
    res = loratool.rescale(adapter, rank=16, output="r16.safetensors")
    loratool.merge("model/", ["r16.safetensors"], "merged/")
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # the in-memory model and the errors
    "Adapter": ("loratool.adapter", "Adapter"),
    "Target": ("loratool.adapter", "Target"),
    "Block": ("loratool.adapter", "Block"),
    "LoraToolError": ("loratool.errors", "LoraToolError"),
    # reading and writing
    "load": ("loratool.io.detect", "load_adapter"),
    "structure": ("loratool.io.registry", "structure"),
    "save": ("loratool.tasks.convert", "save"),
    "open_base": ("loratool.io.base", "open_base"),
    # the operations, one per command
    "inspect": ("loratool.tasks.inspect", "inspect"),
    "validate": ("loratool.tasks.validate", "validate"),
    "convert": ("loratool.tasks.convert", "convert"),
    "rescale": ("loratool.tasks.rescale", "rescale"),
    "combine": ("loratool.tasks.combine", "combine"),
    "merge": ("loratool.tasks.merge", "merge"),
    "extract": ("loratool.tasks.extract", "extract"),
    # what a serving runtime (vLLM, llama.cpp, diffusers, ComfyUI) refuses or mishandles: `validate --for`
    "check_runtime": ("loratool.tasks.serving", "check_runtime"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", *_LAZY]
