"""Reading the adapters a task was given, each with the reader options its dialect takes."""

from __future__ import annotations

import os

from ..adapter import Adapter
from ..errors import UsageError


def load_adapters(paths, options: dict | None = None, base=None, allow_partial: bool = False,
                  lazy: bool = False) -> list:
    """Read several adapters of any dialects.

    Args:
        paths: adapter files or folders.
        options: reader options the user set (see `io.detect.load_adapter`); each is handed to the inputs whose
            dialect takes it.
        base: a base model the task has anyway (merge's BASE), handed to every reader that takes one.
        allow_partial: handed to every reader that takes it (those mapping names to a base: their modules that
            map to no base key are skipped and listed in the adapter's info["skipped"]).
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
    if allow_partial:
        options["allow_partial"] = True
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


def hub_inputs(base, adapters, revision: str | None = None):
    """(base, adapters) with every Hugging Face Hub id (`org/name[@REV]`, not a local path) replaced by its
    snapshot folder in the Hub cache (io.hub); in-memory Adapters and None are left as they are.

    Raises:
        UsageError: `revision` is set and no input is a Hub id.
        FileError: a Hub id cannot be resolved (io.hub.resolve).
    """
    from ..io.hub import resolve_all

    adapters = list(adapters)
    at = [i for i, x in enumerate(adapters) if x is not None and not isinstance(x, Adapter)]
    by_path = isinstance(base, (str, os.PathLike))  # an opened io.base.BaseModel is kept
    pairs = ([(base, "base")] if by_path else []) + [(adapters[i], "adapter") for i in at]
    out = iter(resolve_all(pairs, revision))
    if by_path:
        base = next(out)
    for i in at:
        adapters[i] = next(out)
    return base, adapters


def select_targets(adapters, names, targets=(), exclude=()) -> tuple[list, list[str]]:
    """The adapters with only the targets `targets`/`exclude` select, and the ones left out.

    A target is selected when one of its names matches some `targets` glob (every target when there is none)
    and none matches an `exclude` glob; its names are its key (the base key it resolves to), that key
    without ".weight" (the module path), and the module name it was read with (kohya's underscored name).
    Globs are fnmatch's, case-sensitive.

    Args:
        adapters: in-memory Adapters. names: one name per adapter, for the messages.
        targets, exclude: glob lists.
    Returns:
        (adapters, ["<name>: <key>" of every target left out]).
    Raises:
        UsageError: a `targets` glob matches no target, or the selection leaves no target at all.
    """
    from fnmatch import fnmatchcase

    from ..container import escape

    targets, exclude = tuple(targets or ()), tuple(exclude or ())
    if not targets and not exclude:
        return list(adapters), []

    def labels(t):
        out = {t.key, t.key.removesuffix(".weight")}
        name = t.info.get("kohya_name")
        return out | {name} if isinstance(name, str) else out

    def hits(t, globs):
        return {g for g in globs for n in labels(t) if fnmatchcase(n, g)}

    used, kept, left = set(), [], []
    for name, a in zip(names, adapters):
        keep = []
        for t in a:
            got = hits(t, targets)
            used |= got
            if (not targets or got) and not hits(t, exclude):
                keep.append(t)
            else:
                left.append(f"{name}: {t.key}")
        kept.append(a.replace_targets(keep))
    unused = [g for g in targets if g not in used]
    if unused:
        raise UsageError(f"--targets \"{escape(unused[0])}\" matches no target of the adapters (by base key, module "
                         "path or kohya name); run `loratool inspect` to see their names")
    if not any(len(a) for a in kept):
        raise UsageError(f"--targets/--exclude leave no target of the {sum(len(a) for a in adapters)} there are; "
                         "nothing to do")
    return kept, left


def quantized_weights(reader, folder) -> dict:
    """The quantized weights of an open base (ops.quant's registry: key -> QuantWeight), read with the
    quantization_config of `folder`'s config.json when there is one (a single file: inferred from its tensors).
    Bases without an integer or float8 tensor are not searched."""
    from ..container import read_json_file
    from ..errors import LoraToolError
    from ..ops.quant import find_weights
    from ..spec import FLOAT_DTYPES

    keys = reader.keys()
    if all(reader.info(k)[1] in FLOAT_DTYPES for k in keys):
        return {}
    config = None
    if folder is not None and os.path.isfile(os.path.join(folder, "config.json")):
        try:
            config = read_json_file(os.path.join(folder, "config.json"), "config.json")
        except LoraToolError:
            config = None  # the layout is then inferred from the tensors' names and shapes
    return find_weights(reader.info, keys, config, reader.read)


def quant_view(reader, path):
    """`reader` as the float model it stands for (ops.quant.DequantizedView) when it has quantized weights, else
    `reader` itself: extract and validate read quantized bases dequantized in float32."""
    from ..ops.quant import DequantizedView

    folder = path if path is not None and os.path.isdir(path) else None
    found = quantized_weights(reader, folder)
    return DequantizedView(reader, found) if found else reader
