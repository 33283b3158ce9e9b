"""`loratool merge`: stream W' = W + Σ w_i ΔW_i (or, with --unmerge, W = W' − Σ w_i ΔW_i) into a new base."""

from __future__ import annotations

import contextlib
import sys
import time

import click

from .options import dialect_options, reader_options_of

DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
# --verify refuses a probe error above this many units of the output dtype's epsilon: rounding the merged
# tensor once gives about eps/4 on a random probe; an orientation, scale or index mistake gives far more.
VERIFY_EPS = 8
EPS = {"F16": 2.0 ** -10, "BF16": 2.0 ** -7, "F32": 2.0 ** -23, "F64": 2.0 ** -52}


def run_merge(base_path, adapter_paths, out, *, weights=None, scale=1.0, dtype=None, unmerge=False,
              verify=False, allow_partial=False, device="cpu", overwrite=False, fsync=True, progress=None,
              speculate=None, reader=None, engine="auto") -> dict:
    """Merge adapters into a base model file or folder and write the result to `out`, atomically.

    Args:
        base_path: .safetensors, .pt/.pth/.bin, or a Hugging Face folder.
        adapter_paths: adapters of any dialect loratool reads.
        weights: one weight per adapter (default 1 each). scale: multiplies every weight.
        dtype: output dtype name ("F32", "BF16", "F16", "F64") for every floating-point tensor; None keeps each.
        unmerge: subtract instead of add. verify: probe every merged target (see ops.merge.Merger).
        progress: callable(advance_bytes) or None.
        reader: reader options for the adapters (cli.options.reader_options_of); the base is handed to every
            reader that takes one (kohya names, PEFT prefixes and saved tensors).
        speculate: copy the base in the background while adapters load (default: when torch is not imported
            yet, so that the copy hides the import).
        engine: "numpy" merges float16/bfloat16/float32 tensors of a safetensors base on numpy with torch's
            own sgemm (ops.merge_host; no torch import), "torch" uses torch for everything, and "auto" (the
            default) takes numpy where it can. Both give the same bits.
    Returns:
        A summary dict (targets merged, skipped mismatches, bytes written, seconds, probe errors).
    Raises:
        MismatchError (nothing written) when targets do not fit the base; NumericError on NaN/Inf/overflow or
        a failed probe; FileError, SpecError for unreadable inputs or a refused output.
    """
    from ..fsutil import check_output
    from ..io.stream import FLOAT_DTYPES, Rewriter, open_stream, output_format
    from ..ops import blas

    t0 = time.perf_counter()
    phases = {}  # phase -> seconds since start, in the summary (benchmarks/merge.py --phases reads it)

    def phase(name):
        phases[name] = round(time.perf_counter() - t0, 3)

    adapter_paths = list(adapter_paths)
    if engine not in ("auto", "numpy", "torch"):
        raise ValueError(f"engine {engine!r}: use auto, numpy or torch")
    if speculate is None:
        # Copy the base in the background while torch (or torch's BLAS) loads and the adapters are read; once
        # torch is loaded there is less to hide, and targets would be copied only to be overwritten.
        speculate = "torch" not in sys.modules
    if engine != "torch" and device == "cpu":
        blas.preload()  # dlopen in a thread, without the GIL, while headers and adapters are read
    with open_stream(base_path) as base:
        fmt = output_format(base, out)
        check_output(out, [*base.inputs, *adapter_paths], overwrite)
        eligible = engine != "torch" and device == "cpu" and base.kind != "torch" and fmt != "torch"

        def out_dtype(key, dt):
            return dtype if dtype is not None and dt in FLOAT_DTYPES else dt

        with Rewriter(base, out, fmt, out_dtype=out_dtype, overwrite=overwrite, fsync=fsync) as rw:
            if speculate:  # into the temporary output only: a refusal below still leaves nothing
                rw.start_copy(early=_unlikely_targets(adapter_paths))
            phase("opened")
            with _torch_threads(device, need=not eligible):  # the torch route: before the adapters' tensor ops
                summary = _merge(base, rw, adapter_paths, out_dtype, weights, scale, unmerge, verify,
                                 allow_partial, device, progress, reader, eligible, phase, engine == "numpy")
            rw.commit()
    phase("committed")
    return {"base": str(base_path), "output": str(out), "format": fmt, **summary,
            "seconds": round(time.perf_counter() - t0, 3), "phases": phases}


@contextlib.contextmanager
def _torch_threads(device, need: bool = True):
    """While merging with torch on the CPU, one thread per torch op: the Rewriter runs one tensor per worker
    thread, and an OpenMP team per small op stalls whenever another process holds a core."""
    if not need:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _merge(base, rw, adapter_paths, out_dtype, weights, scale, unmerge, verify, allow_partial, device,
           progress, reader, eligible, phase, need_host=False) -> dict:
    """Load, plan, stream and (if asked) verify; the caller commits the output when everything passed.

    `eligible`: the numpy route may serve this base and output; it is taken when torch's BLAS loaded.
    """
    from ..errors import NumericError, UnsupportedError
    from ..ops import blas
    from ..ops.merge import plan_merge

    from .options import load_inputs

    reader = {k: v for k, v in (reader or {}).items() if k != "base"}
    # With `host`, safetensors adapters are read into numpy (no torch); the torch route converts them.
    loaded = load_inputs(adapter_paths, reader, base=base.reader, host=eligible)
    phase("adapters loaded")
    host = rw.host = eligible and blas.available()
    if need_host and not host:
        raise UnsupportedError("engine numpy needs a safetensors base and output on the CPU, and torch's MKL BLAS; "
                               "use engine torch")
    phase("route chosen")
    adapters = [(str(p), a) for p, a in zip(adapter_paths, loaded)]
    plan = plan_merge(adapters, base.info, weights=weights, scale=scale, unmerge=unmerge,
                      allow_partial=allow_partial)
    _check_fingerprints(base, plan)
    mergers = {}
    for key, terms in plan.terms.items():
        shape, dt = base.info(key)
        odt = out_dtype(key, dt)
        if host:
            from ..ops.merge_host import HostMerger, host_route

            if host_route(dt, odt, device):
                mergers[key] = HostMerger(key, shape, dt, terms, odt, probe=verify)
                continue
        from ..ops.merge import Merger

        mergers[key] = Merger(key, shape, dt, terms, odt, device=device, probe=verify)
    torch_mergers = host and any(not getattr(m, "host", False) for m in mergers.values())
    phase("planned")
    if progress is not None:
        progress(0, total=rw.total_bytes)
    with _torch_threads(device, need=torch_mergers):  # (set already on the torch route)
        stats = rw.run(mergers, progress)
    phase("merged")
    errors = {k: m.probe_error() for k, m in mergers.items()} if verify else {}
    bad = {k: e for k, e in errors.items() if e > VERIFY_EPS * EPS[out_dtype(k, base.info(k)[1])]}
    if bad:
        k = max(bad, key=bad.get)
        raise NumericError(f"target \"{k}\": --verify probe error {bad[k]:.3g} is above {VERIFY_EPS} x the "
                           f"output dtype's epsilon ({len(bad)} target(s) fail); the merge is wrong, nothing was "
                           "written; please report it")
    worst = max(errors, key=errors.get) if errors else None
    return {
        "adapters": [str(p) for p in adapter_paths], "operation": "unmerge" if unmerge else "merge",
        "targets": plan.n_targets, "terms": sum(len(v) for v in plan.terms.values()), "skipped": plan.skipped,
        "tensors": stats["tensors"], "bytes": stats["bytes"],
        "verify": {"max_rel_error": errors[worst], "target": worst} if worst else None,
        "probe_errors": errors, "route": "numpy" if host else "torch",
    }


def _unlikely_targets(adapter_paths):
    """A torch-free guess of the base keys no adapter touches, from the adapters' tensor names alone.

    A base key is a likely target when its module path (the key without .weight/.bias) appears in some
    adapter tensor name, dotted (PEFT, loratool) or underscored (kohya). The guess only orders the background
    copy; which tensors are merged is decided by the loaded adapters.
    """
    from pathlib import Path

    from ..container import read_header
    from ..errors import LoraToolError

    names = []
    for p in map(Path, adapter_paths):
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


def _check_fingerprints(base, plan) -> None:
    """Rule B004: a target that records its base's sha256 refuses any other base (read before writing)."""
    from ..container import escape
    from ..errors import MismatchError

    for key, terms in plan.terms.items():
        want = {t.target.sha256 for t in terms if t.target.sha256}
        if want:
            got = base.sha256(key)
            if got not in want or len(want) > 1:
                raise MismatchError(f"{terms[0].source}: target \"{escape(key)}\" was trained on a base tensor with "
                                    f"sha256 {sorted(want)[0][:12]}..., this base has {got[:12]}... (rule B004); "
                                    "use the adapter's own base")


@click.command()
@click.argument("base", type=click.Path(exists=False, dir_okay=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=False, dir_okay=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=True),
              help="Output file or folder; a .safetensors or .pt/.pth/.bin name chooses that format.")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 1,0.5 (default 1 each).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplies every adapter's weight.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Write every floating-point tensor in this dtype (default: keep each tensor's dtype).")
@click.option("--unmerge", is_flag=True, help="Subtract the adapters instead: turn a merged model back.")
@click.option("--verify", is_flag=True, help="Probe each merged target with a random x and compare W'x with "
              "Wx + s·B(Ax); report the largest relative error and refuse a wrong merge.")
@click.option("--allow-partial", is_flag=True, help="Skip (and report) targets that do not fit the base "
              "instead of refusing.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the float32 arithmetic runs.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-fsync", is_flag=True, help="Skip the final fsync (the rename stays atomic; durability is "
              "left to the kernel, as with cp).")
@click.option("--json", "json_", is_flag=True, help="Print one JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@dialect_options(with_base=False)
def merge(base, adapters, out, weights, scale, dtype, unmerge, verify, allow_partial, device, overwrite, no_fsync,
          json_, quiet, **reader):
    """Merge LoRA adapters into a base model, streaming one tensor at a time.

    W' = W + Σ w_i·ΔW_i computed in float32 and cast once to each tensor's dtype; tensors no adapter
    touches are copied as raw bytes. BASE is a .safetensors file, a .pt/.pth/.bin state dict or a Hugging
    Face folder (sharded or not; its other files are copied). Every adapter target must fit a floating-point
    base tensor of the same shape, or nothing is written.

    Example:

    \b
        loratool merge model/ adapter/ -o merged/
        loratool merge base.safetensors a.safetensors b.safetensors --weights 1,0.5 -o out.safetensors
        loratool merge merged/ adapter/ --unmerge -o base-again/ --verify
    """
    from .render import Progress, emit_json, err, fmt_bytes

    opts = reader_options_of(reader)
    ws = None
    if weights is not None:
        try:
            ws = [float(x) for x in weights.split(",")]
        except ValueError:
            raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers; write e.g. 1,0.5",
                                     param_hint="--weights") from None
        if len(ws) != len(adapters):  # a usage mistake (2), as in combine, not an adapter that misfits (4)
            raise click.BadParameter(f"{len(ws)} weights for {len(adapters)} adapters; give one per adapter",
                                     param_hint="--weights")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from ..errors import UnsupportedError

            raise UnsupportedError("--device cuda: no CUDA device is available here; use --device cpu")
    with Progress("merge", None, enabled=not (quiet or json_)) as bar:
        summary = run_merge(base, adapters, out, weights=ws, scale=scale, dtype=DTYPES.get(dtype), unmerge=unmerge,
                            verify=verify, allow_partial=allow_partial, device=device, overwrite=overwrite,
                            fsync=not no_fsync, progress=bar, reader=opts)
    if json_:
        emit_json(summary)
        return
    for msg in summary["skipped"]:
        err.print(f"skipped: {msg}")
    line = (f"{summary['operation']}d {summary['terms']} target(s) into {summary['targets']} tensor(s) of "
            f"{summary['tensors']}; wrote {fmt_bytes(summary['bytes'])} to {summary['output']} in "
            f"{summary['seconds']:.2f} s")
    if summary["skipped"]:
        line += f"; skipped {len(summary['skipped'])} target(s)"
    if summary["verify"]:
        line += f"; verify: max relative error {summary['verify']['max_rel_error']:.3g}"
    err.print(line)
