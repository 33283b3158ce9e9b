"""`loratool.merge`: stream W' = W + Σ w_i ΔW_i (or, unmerging, W' − Σ w_i ΔW_i) into a new base."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .. import dtypes
from ..errors import MismatchError, NumericError, UsageError
from ..fsutil import maps_os_errors

# --verify refuses a probe error above this many units of the output dtype's epsilon: rounding the merged
# tensor once gives about eps/4 on a random probe; an orientation, scale or index mistake gives far more.
VERIFY_EPS = 8
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass
class MergeResult:
    """What a merge did: the CLI renders it, `as_dict()` is its `--json`."""

    base: str
    output: str
    format: str  # "safetensors", "torch" or "folder"
    adapters: list[str]
    operation: str  # "merge" or "unmerge"
    targets: int  # base tensors changed
    terms: int  # adapter targets applied (several adapters may change one tensor)
    tensors: int  # tensors written
    bytes: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # targets skipped under allow_partial, one message each
    skipped_files: list[str] = field(default_factory=list)  # the base folder's files not copied, with the reason
    verify: dict | None = None  # {"max_rel_error", "target"} with verify
    probe_errors: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds since the start

    def as_dict(self) -> dict:
        return asdict(self)


@maps_os_errors("output")
def merge(base, adapters: Sequence, output, *, weights: Sequence[float] | None = None, scale: float = 1.0,
          dtype: str | None = None, unmerge: bool = False, verify: bool = False, allow_partial: bool = False,
          device: str = "cpu", overwrite: bool = False, fsync: bool = True,
          progress: Callable[..., None] | None = None, reader_options: dict | None = None,
          speculate: bool | None = None) -> MergeResult:
    """Merge adapters into a base model file or folder and write the result to `output`, atomically.

    Args:
        base: a .safetensors file, a .pt/.pth/.bin state dict, or a Hugging Face folder (sharded or not).
        adapters: an adapter, or several: paths of any dialect loratool reads, or in-memory Adapters.
        output: the output file or folder; a .safetensors or .pt/.pth/.bin name picks that format, any other
            name keeps the base's.
        weights: one weight per adapter (default 1 each). scale: multiplies every weight.
        dtype: output dtype ("float32", "bfloat16", "float16", "float64" or F32/BF16/F16/F64) for every
            floating-point tensor; None keeps each tensor's.
        unmerge: subtract instead of add. verify: probe every merged target (ops.merge.Merger) and refuse a
            result whose probe error is above VERIFY_EPS x the output dtype's epsilon.
        device: "cpu" or "cuda" (where the float32 arithmetic runs).
        fsync: make the output durable before renaming it into place (off: as durable as `cp`).
        progress: callable(advance_bytes, total=None) or None.
        reader_options: options for the adapters' readers (see `loratool.load`), e.g. loralib's alpha.
        speculate: copy the base into the temporary output in the background while the adapters are read
            (default: when torch is not imported yet, so that the copy hides its import).
    Returns:
        A MergeResult.
    Raises:
        MismatchError (nothing written) when targets do not fit the base; NumericError on NaN/Inf/overflow or
        a failed probe; FileError, SpecError for unreadable inputs, a base that changed while it was read, or a
        refused output; UsageError for options that do not go together.
    """
    from ..device import blas_threads, session
    from ..fsutil import check_output
    from ..io.stream import FLOAT_DTYPES, Rewriter, open_stream, output_format
    from ..ops.merge import Merger, plan_merge
    from ._inputs import check_weights, load_adapters

    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - t0, 3)

    from ..adapter import Adapter

    items = [adapters] if isinstance(adapters, (str, os.PathLike, Adapter)) else list(adapters)
    paths = [os.fspath(x) for x in items if not isinstance(x, Adapter)]
    names = [f"adapter {i + 1}" if isinstance(x, Adapter) else os.fspath(x) for i, x in enumerate(items)]
    out_name = _dtype_name(dtype)
    check_weights(weights, len(items))
    # Copy the base in the background while the adapters are read; once torch is loaded (a torch adapter or
    # base) there is less to hide, and targets would be copied only to be overwritten.
    if speculate is None:
        speculate = "torch" not in sys.modules
    with session(device) as dev, open_stream(base) as src:
        fmt = output_format(src, output)
        check_output(output, [*src.inputs, *paths], overwrite)

        def out_dtype(key, dt):
            return out_name if out_name is not None and dt in FLOAT_DTYPES else dt

        with Rewriter(src, output, fmt, out_dtype=out_dtype, overwrite=overwrite, fsync=fsync) as rw:
            if speculate:  # into the temporary output only: a refusal below still leaves nothing
                rw.start_copy(early=_unlikely_targets(items))
            phase("opened")

            read = iter(load_adapters(paths, reader_options, base=src.reader, lazy=True) if paths else [])
            loaded = [x if isinstance(x, Adapter) else next(read) for x in items]
            phase("adapters loaded")
            plan = plan_merge(list(zip(names, loaded)), src.info, weights=weights, scale=scale,
                              unmerge=unmerge, allow_partial=allow_partial)
            digests = {k: hashlib.sha256() for k, terms in plan.terms.items() if any(t.target.sha256 for t in terms)}
            mergers = {}
            for key, terms in plan.terms.items():
                shape, dt = src.info(key)
                mergers[key] = Merger(key, shape, dt, terms, out_dtype(key, dt), device=dev, probe=verify)
            phase("planned")
            if progress is not None:
                progress(0, total=rw.total_bytes)
            # One tensor per worker thread, each with a single-threaded BLAS: a BLAS team per small product
            # would stall whenever another process holds a core.
            with blas_threads(1 if dev.is_cpu else None):
                stats = rw.run(mergers, progress, digests=digests)
            phase("merged")
            _check_fingerprints(plan, {k: d.hexdigest() for k, d in digests.items()})
            errors = {k: m.probe_error() for k, m in mergers.items()} if verify else {}
            bad = {k: e for k, e in errors.items() if e > VERIFY_EPS * dtypes.EPS[out_dtype(k, src.info(k)[1])]}
            if bad:
                k = max(bad, key=bad.get)
                raise NumericError(f"target \"{k}\": --verify probe error {bad[k]:.3g} is above {VERIFY_EPS} x the "
                                   f"output dtype's epsilon ({len(bad)} target(s) fail); the merge is wrong, nothing "
                                   "was written; please report it")
            src.reader.check_unchanged()  # a base written in place meanwhile would give a torn output
            rw.commit(config_dtype=out_name)  # config.json says the dtype the weights now have
    phase("committed")
    worst = max(errors, key=errors.get) if errors else None
    return MergeResult(
        base=str(base), output=str(output), format=fmt, adapters=names,
        operation="unmerge" if unmerge else "merge", targets=plan.n_targets,
        terms=sum(len(v) for v in plan.terms.values()), tensors=stats["tensors"], bytes=stats["bytes"],
        seconds=round(time.perf_counter() - t0, 3), skipped=plan.skipped, skipped_files=rw.skipped_files,
        verify={"max_rel_error": errors[worst], "target": worst} if worst else None, probe_errors=errors,
        device=dev.name, phases=phases)


def _dtype_name(dtype: str | None) -> str | None:
    if dtype is None or dtype in DTYPE_NAMES.values():
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"dtype {dtype!r}: use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[dtype]


def _unlikely_targets(adapters):
    """A torch-free guess of the base keys no adapter touches, from the adapters' tensor names alone (the
    target keys of an in-memory Adapter).

    A base key is a likely target when its module path (the key without .weight/.bias) appears in some
    adapter tensor name, dotted (PEFT, loratool) or underscored (kohya). The guess only orders the background
    copy; which tensors are merged is decided by the loaded adapters.
    """
    from ..adapter import Adapter
    from ..container import read_header
    from ..errors import LoraToolError

    names = []
    for item in adapters:
        if isinstance(item, Adapter):
            names.extend(item.targets)
            continue
        p = Path(item)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
        if not files:
            return None  # a torch adapter: no cheap names, so copy nothing early
        for f in files:
            try:
                names.extend(read_header(f).tensors)
            except LoraToolError:
                return None  # the real reader will report it
    blob = "\n".join(names)

    def early(key: str) -> bool:
        stem = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
        return stem not in blob and stem.replace(".", "_") not in blob

    return early


def _check_fingerprints(plan, got: dict[str, str]) -> None:
    """Rule B004: a target that records its base's sha256 refuses any other base. `got` holds the digests of
    the bytes the merge actually read (hashed while reading: no second pass, and a base changed between a
    check and the read cannot slip through)."""
    from ..container import escape

    for key, terms in plan.terms.items():
        want = {t.target.sha256 for t in terms if t.target.sha256}
        if want and (got[key] not in want or len(want) > 1):
            raise MismatchError(f"{terms[0].source}: target \"{escape(key)}\" was trained on a base tensor with "
                                f"sha256 {sorted(want)[0][:12]}..., this base has {got[key][:12]}... (rule B004); "
                                "use the adapter's own base")


__all__ = ["merge", "MergeResult", "VERIFY_EPS", "DTYPE_NAMES"]
