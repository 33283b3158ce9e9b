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
# A requantized float8 weight that keeps less than this share of the adapter's change (||Q(W + ΔW) − Q(W)|| /
# ||ΔW||) is named in a warning: the float8 grid swallows most of the adapter there.
SURVIVAL_WARN = 0.5


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
    excluded: list[str] = field(default_factory=list)  # targets left out by `targets`/`exclude`, "adapter: key"
    skipped_files: list[str] = field(default_factory=list)  # the base folder's files not copied, with the reason
    verify: dict | None = None  # {"max_rel_error", "target"} with verify
    probe_errors: dict[str, float] = field(default_factory=dict)
    # float8 weights requantized with their scheme: key -> ||Q(W + ΔW) − Q(W)|| / ||ΔW|| (the adapter's share kept)
    requantized: dict[str, float] = field(default_factory=dict)
    # quantized weights written dequantized (ops.quant): key written -> scheme
    dequantized: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds since the start
    ties: list[str] = field(default_factory=list)  # what became of tied weights an adapter touches, one line each
    warnings: list[str] = field(default_factory=list)  # --keep-tied, float8 requantization that swallows an adapter

    def as_dict(self) -> dict:
        return asdict(self)


@maps_os_errors("output")
def merge(base, adapters: Sequence, output, *, weights: Sequence[float] | None = None, scale: float = 1.0,
          dtype: str | None = None, unmerge: bool = False, verify: bool = False, allow_partial: bool = False,
          device: str = "cpu", overwrite: bool = False, fsync: bool = True,
          progress: Callable[..., None] | None = None, reader_options: dict | None = None,
          speculate: bool | None = None, revision: str | None = None, targets: Sequence[str] = (),
          exclude: Sequence[str] = (), keep_tied: bool = False, keep_quantized: bool = False) -> MergeResult:
    """Merge adapters into a base model file or folder and write the result to `output`, atomically.

    Args:
        base: a .safetensors file, a .pt/.pth/.bin state dict, a Hugging Face folder (sharded or not), or a Hub
            id `org/name[@REV]` (io.hub: a local path always wins).
        adapters: an adapter, or several: paths of any dialect loratool reads, PEFT adapters' Hub ids, or
            in-memory Adapters.
        output: the output file or folder; a .safetensors or .pt/.pth/.bin name picks that format, any other
            name keeps the base's.
        weights: one weight per adapter (default 1 each). scale: multiplies every weight.
        dtype: output dtype ("float32", "bfloat16", "float16", "float64" or F32/BF16/F16/F64) for every
            floating-point tensor; None keeps each tensor's.
        allow_partial: skip (and list in `skipped`) the targets that do not fit the base, and the adapter
            modules that map to no base key (the readers of PEFT, kohya and loralib), instead of refusing.
        unmerge: subtract instead of add. verify: probe every merged target (ops.merge.Merger) and refuse a
            result whose probe error is above VERIFY_EPS x the output dtype's epsilon.
        device: "cpu" or "cuda" (where the float32 arithmetic runs).
        fsync: make the output durable before renaming it into place (off: as durable as `cp`).
        progress: callable(advance_bytes, total=None) or None.
        reader_options: options for the adapters' readers (see `loratool.load`), e.g. loralib's alpha.
        speculate: copy the base into the temporary output in the background while the adapters are read
            (default: when torch is not imported yet, so that the copy hides its import).
        revision: the Hub revision (branch, tag, commit) of every Hub id given without its own `@REV`.
        targets, exclude: fnmatch globs; only targets matching some `targets` glob (all when empty) and no
            `exclude` glob are merged (tasks._inputs.select_targets); the others are listed in `excluded`.
        keep_tied: for a base whose head is tied to its embedding (io.ties), merge an adapter on either into the
            one tensor so both sides move (PEFT's merge_and_unload), with a warning. By default the pair is
            untied: the targeted side changes, the other keeps the original tensor (a head the base does not
            store is written), and config.json says tie_word_embeddings false: the merged model computes
            what the adapter model computes unmerged (ops/ties.py). Unmerging a tied base moves both sides.
        keep_quantized: insist on writing every quantized weight in its own scheme. Only FP8 weights can be
            (they are by default, without `dtype`); a base with weights of another scheme (ops.quant: bitsandbytes,
            GPTQ, AWQ, MXFP4) is refused, as requantizing to 4 or 8 bits is out of scope.

    Quantized bases (ops.quant's registry): FP8 weights are requantized with their scheme unless `dtype` is
    given; every other quantized weight is written dequantized (merged where an adapter reaches it) in `dtype`,
    bfloat16 by default, under the float key it stands for (GPTQ/AWQ `qweight` -> `weight`, MXFP4 `x_blocks` ->
    `x`), its companion tensors are not written, and config.json loses its quantization_config.
    Returns:
        A MergeResult.
    Raises:
        MismatchError (nothing written) when targets do not fit the base; NumericError on NaN/Inf/overflow or
        a failed probe; FileError, SpecError for unreadable inputs, a base that changed while it was read, or a
        refused output; UsageError for options that do not go together.
    """
    from ..device import blas_threads, session
    from ..fsutil import check_output
    from ..io.experts import experts_view, fit_experts
    from ..io.stream import FLOAT_DTYPES, Computed, Rewriter, open_stream, output_format
    from ..io.ties import CONFIG_KEY, find_ties, with_heads
    from ..ops.fp8 import Fp8Target
    from ..ops.merge import Merger, plan_merge
    from ..ops.quant import SCHEMES, DequantizedView, Dequantizing
    from ..ops.ties import resolve_ties
    from ._inputs import check_weights, hub_inputs, load_adapters, select_targets

    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name):
        phases[name] = round(time.perf_counter() - t0, 3)

    from ..adapter import Adapter

    items = [adapters] if isinstance(adapters, (str, os.PathLike, Adapter)) else list(adapters)
    names = [f"adapter {i + 1}" if isinstance(x, Adapter) else os.fspath(x) for i, x in enumerate(items)]
    out_name = _dtype_name(dtype)
    check_weights(weights, len(items))
    shown_base = str(base)
    base, items = hub_inputs(base, items, revision)  # Hub ids -> snapshot folders in the Hub cache
    paths = [os.fspath(x) for x in items if not isinstance(x, Adapter)]
    # Copy the base in the background while the adapters are read; once torch is loaded (a torch adapter or
    # base) there is less to hide, and targets would be copied only to be overwritten.
    if speculate is None:
        speculate = "torch" not in sys.modules
    with session(device) as dev, open_stream(base) as src:
        fmt = output_format(src, output)
        check_output(output, [*src.inputs, *paths], overwrite)
        found = _quantized(src)
        _check_keep(found, keep_quantized, out_name, shown_base)
        # FP8 weights keep their scheme (requantized) unless --dtype asks for a dequantized merge; the other
        # schemes cannot be requantized: written dequantized in --dtype, bfloat16 by default.
        keep = {k: q for k, q in found.items() if out_name is None and SCHEMES[q.scheme].requantize}
        quant = {k: q.params["fp8"] for k, q in keep.items()}
        dequant = {k: q.params["fp8"] for k, q in found.items() if k not in keep and "fp8" in q.params}
        computed = {k: Computed(q.shape, out_name or "BF16", q.stored) for k, q in found.items()
                    if k not in keep and k not in dequant}
        drop = frozenset(o for k, q in found.items() if k not in keep for o in q.owned if o not in dequant)

        def out_dtype(key, dt):
            return out_name if out_name is not None and (dt in FLOAT_DTYPES or key in dequant) else dt

        with Rewriter(src, output, fmt, out_dtype=out_dtype, overwrite=overwrite, fsync=fsync, drop=drop,
                      computed=computed) as rw:
            if speculate:  # into the temporary output only: a refusal below still leaves nothing
                rw.start_copy(early=_unlikely_targets(items))
            phase("opened")

            # Readers see a tied head the file does not store (io.ties), so a target on it resolves; each target's
            # factors are read when its tensor is merged (lazy), so memory does not grow with the adapter.
            # Adapters resolve against the float model a quantized base stands for (bitsandbytes' packed `weight`
            # has its dequantized shape there, GPTQ's `qweight` is `weight`), and see the experts under both forms
            # (io.experts), so that a per-expert adapter resolves on a fused base and a fused one on a per-expert
            # base; fit_experts then moves those targets onto stored tensors.
            qview = DequantizedView(src.reader, found) if found else src.reader
            view = experts_view(with_heads(qview, find_ties(qview, base)))
            read = iter(load_adapters(paths, reader_options, base=view, allow_partial=allow_partial, lazy=True)
                        if paths else [])
            loaded = [fit_experts(x if isinstance(x, Adapter) else next(read), view) for x in items]
            loaded, excluded = select_targets(loaded, names, targets, exclude)
            phase("adapters loaded")
            ties = find_ties(qview, base, wanted=[k for a in loaded for k in a.targets])
            plan = plan_merge(list(zip(names, loaded)), with_heads(qview, ties).info, weights=weights,
                              scale=scale, unmerge=unmerge, allow_partial=allow_partial)
            tied = resolve_ties(plan.terms, ties, keep_tied=keep_tied, unmerge=unmerge)
            plan.terms = tied.terms
            rw.add_sources(tied.sources)  # a tied head the base does not store, written untied

            def info(key):
                return src.info(tied.sources.get(key, key))

            # A weight written dequantized from other tensors has no bytes of its own to fingerprint (rule B004 is
            # checked on the tensors read as they are).
            digests = {k: hashlib.sha256() for k, terms in plan.terms.items()
                       if any(t.target.sha256 for t in terms) and k not in computed}
            mergers, fp8 = {}, {}
            # Every quantized weight written dequantized, merged or not: under a new key (computed: GPTQ's qweight
            # is weight) or, for float8 under --dtype, in place of its own.
            for key, dt in [*((k, c.dtype) for k, c in computed.items()), *((k, out_name) for k in dequant)]:
                mergers[key] = Dequantizing(found[key], plan.terms.get(key, []), src.reader, dt, device=dev,
                                            probe=verify and key in plan.terms)
            for key, terms in plan.terms.items():
                if key in dequant or key in computed:
                    continue
                shape, dt = info(key)
                if key in quant:  # dequantized, merged in float32, requantized with its own scheme
                    fp8[key] = Fp8Target(key, shape, quant[key], terms, src.reader, device=dev, probe=verify)
                    mergers[key], mergers[quant[key].scale_key] = fp8[key].weight, fp8[key].scales
                else:
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
            probes = {k: fp8[k].probe_merger if k in fp8 else mergers[k] for k in plan.terms}
            errors = {k: m.probe_error() for k, m in probes.items()} if verify else {}
            # A float8 weight's probe checks its float32 merge; the requantization is reported as `requantized`.
            bad = {k: e for k, e in errors.items()
                   if e > VERIFY_EPS * dtypes.EPS["F32" if k in fp8 else computed[k].dtype if k in computed
                                                  else out_dtype(k, info(k)[1])]}
            if bad:
                k = max(bad, key=bad.get)
                raise NumericError(f"target \"{k}\": --verify probe error {bad[k]:.3g} is above {VERIFY_EPS} x the "
                                   f"output dtype's epsilon ({len(bad)} target(s) fail); the merge is wrong, nothing "
                                   "was written; please report it")
            src.reader.check_unchanged()  # a base written in place meanwhile would give a torn output
            # config.json says the dtype the weights now have, that an untied pair is no longer tied, and no
            # quantization when float8 weights were written dequantized
            rw.commit(config_dtype=out_name, config_updates={CONFIG_KEY: False} if tied.untie else None,
                      dequantized=bool(dequant or computed))
            if tied.untie and not (fmt == "folder" and src.folder is not None
                                   and (src.folder / "config.json").is_file()):
                tied.notes.append(f"the output has no config.json: load it with {CONFIG_KEY}=False, or the loader "
                                  "ties the head to the changed embedding again")
    phase("committed")
    worst = max(errors, key=errors.get) if errors else None
    kept = {k: t.survival() for k, t in fp8.items()}
    lost = sorted((k for k, v in kept.items() if v < SURVIVAL_WARN), key=kept.get)
    warnings = [f"float8 requantization keeps under {SURVIVAL_WARN:.0%} of the adapter's change on {len(lost)} "
                f"weight(s) (least: {lost[0]}, {kept[lost[0]]:.1%}); the float8 grid is coarser than the change: "
                "pass --dtype bfloat16 for a dequantized merge"] if lost else []
    return MergeResult(
        base=shown_base, output=str(output), format=fmt, adapters=names,
        operation="unmerge" if unmerge else "merge", targets=plan.n_targets,
        terms=sum(len(v) for v in plan.terms.values()), tensors=stats["tensors"], bytes=stats["bytes"],
        seconds=round(time.perf_counter() - t0, 3),
        skipped=[m for a in loaded for m in a.info.get("skipped", [])] + plan.skipped,
        excluded=excluded, skipped_files=rw.skipped_files,
        verify={"max_rel_error": errors[worst], "target": worst} if worst else None, probe_errors=errors,
        requantized=kept, dequantized={k: q.scheme for k, q in found.items() if k in dequant or k in computed},
        device=dev.name, phases=phases, ties=tied.notes, warnings=tied.warnings + warnings)


def _dtype_name(dtype: str | None) -> str | None:
    if dtype is None or dtype in DTYPE_NAMES.values():
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"dtype {dtype!r}: use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[dtype]


def _quantized(src) -> dict:
    """The base's quantized weights (ops.quant's registry): key -> QuantWeight."""
    from ._inputs import quantized_weights

    return quantized_weights(src.reader, src.folder)


def _check_keep(found: dict, keep_quantized: bool, out_name: str | None, base: str) -> None:
    """keep_quantized: refused with --dtype, and for a base with weights no scheme of it can requantize."""
    from ..container import escape
    from ..errors import UnsupportedError
    from ..ops.quant import SCHEMES

    if not keep_quantized:
        return
    if out_name is not None:
        raise UsageError("--keep-quantized writes quantized weights in their own scheme, --dtype writes them "
                         "dequantized; pass one of them")
    lost = sorted((k for k, q in found.items() if not SCHEMES[q.scheme].requantize), key=str)
    if lost:
        q = found[lost[0]]
        raise UnsupportedError(f"{base}: \"{escape(q.stored)}\" is quantized as {q.scheme} ({len(lost)} such "
                               f"weight(s)); loratool requantizes FP8 only, writing {q.scheme} again is out of scope: "
                               "drop --keep-quantized for a dequantized merge (bfloat16, or --dtype), and quantize "
                               "that with its own library if needed")


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
        if want and key in got and (got[key] not in want or len(want) > 1):
            raise MismatchError(f"{terms[0].source}: target \"{escape(key)}\" was trained on a base tensor with "
                                f"sha256 {sorted(want)[0][:12]}..., this base has {got[key][:12]}... (rule B004); "
                                "use the adapter's own base")


__all__ = ["merge", "MergeResult", "VERIFY_EPS", "DTYPE_NAMES"]
