"""`loratool.convert` and `loratool.save`: write an adapter in any dialect loratool writes, exactly or not at all."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

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
    """(dialect written, bytes written): `save`, for the tasks that report their size.

    An adapter read from kohya without a base keeps kohya's names as target keys, which only kohya can write
    back: a ".safetensors" name without `to` writes kohya then, and another dialect is refused (as `convert`
    does), so the file written always fits the base that `merge` and `validate --base` are given.
    """
    from ..fsutil import check_output, os_errors
    from ..io import registry

    unmapped = bool(adapter.info.get("kohya_unmapped"))
    kohya = registry.get("kohya")
    writer = kohya if unmapped and to is None and os.fspath(path).endswith(kohya.suffix) else \
        registry.writer_for(path, to)
    if unmapped and writer is not kohya:
        raise _unmapped_error(adapter, path)
    check_output(path, [p for p in inputs if p is not None], overwrite)
    with os_errors(path):  # names this output, even for a caller whose own output argument was None
        nbytes = writer.write(fitted(adapter, writer), path, overwrite=overwrite, **options)
    return writer.name, nbytes


def _unmapped_error(adapter: Adapter, path, fix: str = "pass --base, or write kohya (--to kohya)"):
    from ..container import escape
    from ..errors import MismatchError

    return MismatchError(f"{path}: kohya names such as \"{escape(next(iter(adapter.targets), ''))}\" cannot be turned "
                         f"back into dotted module paths without the model; {fix}")


def fitted(adapter: Adapter, writer, folded: list | None = None) -> Adapter:
    """The adapter as `writer` (an io.registry Dialect) holds it: every lora target the dialect does not hold as
    it is (several blocks, for PEFT and kohya) folded into one exact pair over the whole weight (ops/fold.py;
    the rank grows to the sum of the blocks' ranks). The adapter itself when nothing needs folding. The keys
    of the targets folded are appended to `folded` when it is given."""
    if writer.holds is None or all(t.kind != "lora" or writer.holds(t) for t in adapter):
        return adapter
    from ..ops.fold import fold_adapter

    adapter, keys = fold_adapter(adapter, keep=writer.holds)
    if folded is not None:
        folded.extend(keys)
    return adapter


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the adapter as read (numpy factors), the dialects read and written, bytes written, and
    the targets folded into one A/B pair because the output dialect holds one per module (ops/fold.py)."""

    adapter: Adapter
    dialect: str
    to: str
    bytes: int
    output: str = ""
    folded: tuple[str, ...] = ()  # targets folded into one pair for the output dialect (ops/fold.py)
    excluded: list = field(default_factory=list)  # targets left out by `targets`/`exclude`
    converted: list = field(default_factory=list)  # LyCORIS targets made LoRA by `rank`/`energy` (ops.kinds)


@maps_os_errors("output")
def convert(path, output, *, to: str | None = None, overwrite: bool = False, kohya_prefix: str = "lora_unet_",
            revision: str | None = None, targets=(), exclude=(), rank: int | None = None,
            energy: float | None = None, **options) -> ConvertResult:
    """Read an adapter of any dialect and write it in another without changing ΔW, exactly or not at all.

    A target with several blocks (an exact combine, a fused qkv adapted slice by slice) is folded into one
    A/B pair of rank Σ r_i for dialects that hold one pair per module (PEFT, kohya): ops/fold.py.

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
        rank, energy: make every LoHa, LoKr and LoCon-Tucker target a LoRA pair by the optimal truncation of
            its exact ΔW at this rank, or retaining this fraction of ‖ΔW‖²_F (ops.to_lora); the result's
            `converted` lists each with its error and the optimum. Without them such a target is written only
            to dialects that hold it (kohya, loratool) and refused by the others.
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
    adapter = _load(registry, src, d, options)
    if not len(adapter) and adapter.info.get("skipped"):
        raise MismatchError(f"{path}: no module maps to the base ({len(adapter.info['skipped'])} skipped under "
                            f"--allow-partial, the first: {adapter.info['skipped'][0]}); nothing was written")
    (adapter,), excluded = select_targets([adapter], [os.fspath(path)], targets, exclude)
    if adapter.info.get("kohya_unmapped") and writer.name != d.name:
        raise _unmapped_error(adapter, path, "pass --base")
    # PEFT output names its base (as given: a Hub id stays one) and task, so AutoPeftModelFor* loads it (kept
    # from a PEFT input otherwise).
    named = ({"base_model_name_or_path": os.fspath(given_base), "task_type": task_type_of(base)}
             if isinstance(base, (str, os.PathLike)) else {})
    converted: list = []
    if rank is not None or energy is not None:
        from ..ops.to_lora import to_lora

        adapter, converted = to_lora(adapter, rank=rank, energy=energy)
    else:
        _check_kinds(adapter, writer)
    folded: list[str] = []
    nbytes = writer.write(fitted(adapter, writer, folded), output, overwrite=overwrite, prefix=kohya_prefix,
                          **named)
    return ConvertResult(adapter=adapter, dialect=d.name, to=writer.name, bytes=nbytes, output=os.fspath(output),
                         folded=tuple(folded), excluded=excluded, converted=converted)


def _load(registry, src, d, options) -> Adapter:
    """The adapter read against the base when there is one, which shows its experts in both forms (io.experts):
    an adapter on per-expert linears is moved onto a fused base's tensors and the other way round, so the
    output fits the base given (a fused target becomes PEFT target_parameters, per-expert ones target_modules)."""
    base = options.get("base")
    if base is None:
        return registry.load(src, dialect=d, **options)
    from ..io.base import open_base
    from ..io.experts import experts_view, fit_experts

    with open_base(base) as model:
        view = experts_view(model)
        return fit_experts(registry.load(src, dialect=d, **{**options, "base": view}), view)


def _check_kinds(adapter: Adapter, writer) -> None:
    """Refuse, before anything is written, a LyCORIS or DoRA target for a dialect that has no such kind
    (Dialect.kinds; the writer checks further what its format can hold of the kinds it has)."""
    from ..adapter import FACTORED_KINDS
    from ..container import escape
    from ..errors import UnsupportedError

    for t in adapter:
        if t.is_dora and "dora" not in writer.kinds:
            raise UnsupportedError(f"target \"{escape(t.key)}\" is DoRA, which {writer.name} cannot hold here: its "
                                   "merge is not W + low rank; write loratool, kohya (--to kohya) or peft "
                                   "(--to peft), or merge it")
        if t.kind in FACTORED_KINDS and t.kind not in writer.kinds:
            raise UnsupportedError(f"target \"{escape(t.key)}\" is {t.kind}, which {writer.name} cannot hold; pass "
                                   "--rank or --energy to make it LoRA by the optimal truncation of its exact ΔW, or "
                                   "write loratool or kohya (--to kohya)")


__all__ = ["save", "convert", "fitted", "ConvertResult"]
