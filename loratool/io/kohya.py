"""kohya-ss/sd-scripts LoRA files (`networks/lora.py`): one `.safetensors` of per-module tensors

    <name>.lora_down.weight   (r, in) or conv (r, in, kh, kw)
    <name>.lora_up.weight     (out, r) or conv (out, r, 1, 1)
    <name>.alpha              0-d: scale = alpha / r; missing, or 0, means alpha = r (LoRAModule.__init__
                              and create_network_from_weights), which loratool records in the target's info
    <name>.lora_down.<i>.weight / .lora_up.<i>.weight   split_dims (lora_flux.py): pair i covers the i-th
                              consecutive slice of output rows, sharing one alpha; read as row blocks

where <name> is a prefix (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`, `lora_te3`, ...) joined by "_" to
the module's path with every "." written as "_". The underscores cannot be undone without the model, so
target keys are resolved against a base (`base=`): the one base key `<module>.weight` whose underscored
module path equals the name after its prefix, or ends with "_" + it. Without a base the target key is
`<name>.weight` and info["kohya_unmapped"] is set, which is enough to inspect or to write kohya again.

`structure` reads the header and the 0-d alpha tensors only; `load` reads the factors as numpy arrays (all now,
or each target's when asked with `lazy=True`), each planned once (Lazy: which tensor, which reshape), so they
agree by construction. No torch anywhere here.

Merge math (LoRAInfModule.merge_to): linear W += s up @ down; conv 1x1 the same on squeezed factors;
conv k x k W += s conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3), which equals
(up[:, :, 0, 0] @ down.reshape(r, -1)).reshape(out, in, kh, kw): the "conv" layout on W.reshape(out, -1).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from ..adapter import FACTORED_KINDS, Adapter, Block, Target, alpha_for_scale
from ..container import escape, read_scalars, write_file
from ..errors import MismatchError, NumericError, SpecError, UnsupportedError
from . import lycoris
from ._common import (Dialect, Meta, Source, as_source, attempt, base_keys, check_unknown, deferred, fits,
                      header_only, materialize, metas_of_header, ref, refusal, safetensors_reader, settle)
from .native import numpy_tensors, tensors_of

PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_", "lora_")
NAME = re.compile(r"^(?P<name>[^.]+)\.(?:(?P<f>lora_down|lora_up)(?:\.(?P<i>0|[1-9][0-9]{0,4}))?\.weight"
                  r"|(?P<alpha>alpha))$", re.S)
# Keys of other networks that share kohya's naming: recognised and refused with the reason.
# LyCORIS's LoCon (Tucker), LoHa, LoKr and DoRA tensors are read (io/lycoris.py).
REFUSED = {
    "dora_layer.weight": "is a DoRA magnitude in a layout no loader defines (LyCORIS writes dora_scale)",
    "oft_blocks": "is an OFT/BOFT block (multiplicative), not LoRA",
    "diff": "is a LyCORIS full-weight difference, not LoRA",
    "w_norm": "is a LyCORIS norm delta, not LoRA",
    "b_norm": "is a LyCORIS norm delta, not LoRA",
    "diff_b": "is a LyCORIS bias difference, not LoRA",
    "a1.weight": "is a GLoRA factor, not LoRA",
}
ALPHA_MISSING = "missing; alpha = rank (scale 1), as sd-scripts does"
ALPHA_ZERO = "0; alpha = rank (scale 1), as sd-scripts does"


def strip_prefix(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def structure(path, *, base=None, allow_unknown: bool = False, allow_partial: bool = False,
              problems: list | None = None) -> Adapter:
    """The adapter of a kohya file (every factor None) from its safetensors header, plus the 0-d `.alpha`
    tensors (a few bytes each, the only data it reads); no torch.

    Args and Raises: as `load`.
    """
    return header_only(_plan(path, base, allow_unknown, allow_partial, then=lambda adapter, read: adapter,
                             problems=problems))


def load(path, *, base=None, allow_unknown: bool = False, allow_partial: bool = False,
         problems: list | None = None, lazy: bool = False) -> Adapter:
    """Read a kohya/sd-scripts LoRA `.safetensors` with its tensors, as numpy arrays (no torch).

    Args:
        path: the file (or a Source of it).
        base: base model (path or io.base.BaseModel) to map underscore names to dotted keys and check shapes.
        allow_unknown: record keys that are not kohya LoRA tensors in info["unknown_keys"] instead of failing.
        allow_partial: with a base, skip the modules whose names map to no base key (or whose shape does not
            fit it), listing each in info["skipped"], instead of failing: the UNet part of a UNet + text
            encoder file merges into a UNet.
        problems: a list to collect the refusals of single modules in (they are left out, the rest is read);
            without it they are raised together, every module named.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`).
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, name and fix in the message.
    """
    return _plan(path, base, allow_unknown, allow_partial, then=deferred if lazy else materialize,
                 problems=problems)


def _plan(path, base, allow_unknown, allow_partial, then, problems=None):
    src = as_source(path)
    hdr = src.checked_header()
    metas = metas_of_header(hdr)
    read = safetensors_reader(src.path, hdr)  # pinned now: the alphas and factors all come from this file
    with base_keys(base) as bk:
        adapter = _build(src.path, metas, dict(hdr.metadata), lambda names: read_scalars(src.path, hdr, names), bk,
                         allow_unknown, allow_partial, problems)
        return then(adapter, read)


def _build(path, metas, meta, read_alphas, bk, allow_unknown, allow_partial=False, problems=None) -> Adapter:
    """The adapter with Lazy factors from the tensors' names and shapes (and the alpha values, read here)."""
    modules: dict[str, dict] = {}
    unknown, refused = [], []  # refused: every key and module refused, reported together (settle)
    for key, x in metas.items():
        m = NAME.match(key)
        if m is None:
            name, _, rest = key.partition(".")
            if rest in lycoris.SUFFIXES:
                modules.setdefault(name, {"down": {}, "up": {}, "alpha": None, "lyc": {}})["lyc"][rest] = x
                continue
            why = next((why for suffix, why in REFUSED.items() if rest == suffix or rest.startswith(suffix + ".")
                        or rest.startswith(suffix.split(".")[0] + "_")), None)
            if why is not None:
                refused.append(refusal(UnsupportedError, "K002", f"{path}: \"{escape(key)}\" {why}; loratool reads "
                                       "LoRA, LoCon, LoHa, LoKr and DoRA only", key))
            else:
                unknown.append(key)
            continue
        d = modules.setdefault(m["name"], {"down": {}, "up": {}, "alpha": None, "lyc": {}})
        if m["alpha"]:
            d["alpha"] = x
        else:
            d["down" if m["f"] == "lora_down" else "up"][-1 if m["i"] is None else int(m["i"])] = x
    alphas = read_alphas({d["alpha"].name for d in modules.values()
                          if d["alpha"] is not None and d["alpha"].numel == 1 and d["alpha"].dtype != "BOOL"})
    info: dict = {"dialect": "kohya"}
    targets: dict[str, Target] = {}
    skipped: list[str] = []
    for name, d in sorted(modules.items()):
        t = attempt(refused, fits, lambda name=name, d=d: _target(path, name, d, alphas, bk), allow_partial, skipped)
        if t is None:
            continue
        if t.key in targets:
            refused.append(refusal(SpecError, "F002", f"{path}: two kohya names map to base key \"{escape(t.key)}\"",
                                   name))
            continue
        targets[t.key] = t
    settle(path, refused, problems)
    if bk is None and targets:
        info["kohya_unmapped"] = True
        info["note"] = "target keys are kohya names; pass --base to map them to the base's dotted keys"
    missing = sorted(t.key for t in targets.values() if t.info.get("alpha") in (ALPHA_MISSING, ALPHA_ZERO))
    if missing:
        info["alpha_defaulted"] = f"{len(missing)} module(s) without a usable alpha: alpha = rank, as sd-scripts does"
    if skipped:
        info["skipped"] = skipped
    check_unknown(path, "kohya", unknown, allow_unknown, info)
    return Adapter(targets=targets, metadata=dict(meta), info=info)


def _alpha_value(path, a: Meta, alphas: dict) -> float:
    """The number stored in a kohya `.alpha` tensor (any real dtype, one element)."""
    if a.dtype == "BOOL" or a.numel != 1:
        raise refusal(SpecError, "K005", f"{path}: \"{escape(a.name)}\" has shape {list(a.shape)}; alpha is one "
                      "number", a.name)
    return alphas[a.name]


def _alpha(path, d, alphas, r, tinfo) -> float:
    """The module's alpha; missing or 0 means alpha = r (recorded in tinfo), as sd-scripts and LyCORIS do."""
    if d["alpha"] is None:
        tinfo["alpha"] = ALPHA_MISSING
        return float(r)
    a = d["alpha"]
    alpha = _alpha_value(path, a, alphas)
    if not math.isfinite(alpha):
        raise refusal(SpecError, "K005", f"{path}: \"{escape(a.name)}\" is {alpha}; alpha must be finite", a.name)
    if alpha == 0.0:
        tinfo["alpha"] = ALPHA_ZERO
        return float(r)
    return alpha


def _resolve(path, name, shape, bk) -> tuple[str, tuple[int, ...]]:
    """The base key of a module and the weight shape to use: the factors' shape, or the base's when it is the
    same weight seen flat (a conv ΔW the factors give as (out, in·k), or 1x1 conv factors on a Linear)."""
    shown = escape(name)
    if bk is None:
        return name + ".weight", shape
    key = bk.resolve_underscored(strip_prefix(name), f"{path}: module \"{shown}\"", name)
    have = bk.shape(key)
    if have is not None and have != shape and len(have) >= 2 and have[0] == shape[0] and \
            math.prod(have[1:]) == math.prod(shape[1:]) and (len(have) > 2 or all(k == 1 for k in shape[2:])):
        shape = tuple(have)
    if have != shape:
        raise refusal(MismatchError, "B002", f"{path}: module \"{shown}\": factors imply weight {list(shape)} but "
                      f"base \"{escape(key)}\" is {list(have)}", name)
    return key, shape


def _lycoris_target(path, name, d, alphas, bk, kind) -> Target:
    """A LoHa, LoKr, LoCon-Tucker or DoRA module (io/lycoris.py)."""
    tinfo: dict = {"kohya_name": name, "lycoris": kind}
    lyc = d["lyc"]
    if kind == "dora":
        pair = _target(path, name, {**d, "lyc": {}}, alphas, bk)
        if len(pair.blocks) != 1:
            raise lycoris._bad(path, name, "dora_scale on split_dims pairs")
        axis, eps = lycoris.dora_of(path, name, lyc["dora_scale"], pair.shape)
        m = lyc["dora_scale"]
        return replace(pair, kind="dora", magnitude=ref(m.name, lambda x: x.reshape(-1)), dora_axis=axis,
                       dora_eps=eps, info={**pair.info, "lycoris": "dora", "dora_scale_shape": list(m.shape)})
    got, shape, r, both_whole = lycoris.factors_of(path, name, kind, lyc, d)
    alpha = _alpha(path, d, alphas, r, tinfo) if r else 1.0
    if d["alpha"] is not None:
        tinfo["lycoris_alpha"] = alphas.get(d["alpha"].name, alpha)
    key, shape = _resolve(path, name, tuple(int(x) for x in shape), bk)
    magnitude, axis, eps = None, "out", 0.0
    if "dora_scale" in lyc:
        axis, eps = lycoris.dora_of(path, name, lyc["dora_scale"], shape)
        magnitude = ref(lyc["dora_scale"].name, lambda x: x.reshape(-1))
        tinfo["dora_scale_shape"] = list(lyc["dora_scale"].shape)
    tinfo["factor_shapes"] = {k: list(m.shape) for k, m in got.items()}
    if magnitude is not None:
        tinfo["factor_shapes"]["magnitude"] = list(lyc["dora_scale"].shape)
    return Target(key=key, layout="conv" if len(shape) > 2 else "linear", shape=shape, kind=kind,
                  factors=lycoris.lazy_factors(kind, got), delta_scale=lycoris.scale_for(kind, alpha, r, both_whole),
                  magnitude=magnitude, dora_axis=axis, dora_eps=eps, dora=magnitude is not None, info=tinfo)


def _target(path, name, d, alphas, bk) -> Target:
    shown = escape(name)
    kind = lycoris.kind_of(d["lyc"], bool(d["down"]))
    if kind is not None:
        return _lycoris_target(path, name, d, alphas, bk, kind)
    if d["lyc"]:
        raise lycoris._bad(path, name, f"{', '.join(sorted(d['lyc']))} without the factors it belongs to")
    downs, ups = d["down"], d["up"]
    if not downs or set(downs) != set(ups):
        have = "lora_down" if downs else "lora_up"
        raise refusal(SpecError, "K003", f"{path}: module \"{shown}\" has {have} without its matching "
                      f"{'lora_up' if downs else 'lora_down'}; every kohya module needs both", name)
    split = -1 not in downs
    if not split and len(downs) > 1:
        raise refusal(SpecError, "K007", f"{path}: module \"{shown}\" mixes lora_down.weight with numbered split_dims "
                      "factors", name)
    order = sorted(downs)
    if split and order != list(range(len(order))):
        raise refusal(SpecError, "K007", f"{path}: module \"{shown}\": split_dims factors are numbered {order}, not "
                      f"0..{len(order) - 1}", name)
    pairs = [(downs[i], ups[i]) for i in order]
    for down, up in pairs:
        if not (down.is_float and up.is_float):
            raise refusal(SpecError, "K006", f"{path}: module \"{shown}\": factors are {down.dtype}/{up.dtype}, not "
                          "floating point", name)
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
                any(k != 1 for k in up.shape[2:]):
            raise refusal(SpecError, "K006", f"{path}: module \"{shown}\": lora_down {list(down.shape)} and lora_up "
                          f"{list(up.shape)} are not a LoRA pair (2-D, or conv with a 1x1 lora_up)", name)
    r = int(pairs[0][0].shape[0])
    if split and (any(p[0].ndim != 2 or p[0].shape != pairs[0][0].shape for p in pairs)):
        raise refusal(SpecError, "K007", f"{path}: module \"{shown}\": split_dims pairs must be 2-D with equal "
                      "lora_down shapes", name)
    tinfo: dict = {"kohya_name": name}
    alpha = _alpha(path, d, alphas, r, tinfo)
    down0 = pairs[0][0]
    out = sum(int(p[1].shape[0]) for p in pairs)
    conv = down0.ndim == 4
    shape = (out, *(int(s) for s in down0.shape[1:]))
    key = name + ".weight"
    if bk is not None:
        key = bk.resolve_underscored(strip_prefix(name), f"{path}: module \"{shown}\"", name)
        have = bk.shape(key)
        if conv and down0.shape[2:] == (1, 1) and have == shape[:2]:
            conv, shape = False, shape[:2]  # sd-scripts merges 1x1 conv factors into a Linear weight squeezed
        if have != shape:
            raise refusal(MismatchError, "B002", f"{path}: module \"{shown}\": factors imply weight {list(shape)} but "
                          f"base \"{escape(key)}\" is {list(have)}", name)
    layout = "conv" if conv else "linear"
    inp = math.prod(shape[1:])
    blocks, row = [], 0
    for down, up in pairs:
        n = int(up.shape[0])
        blocks.append(Block(rank=r, alpha=alpha, scale_rule="standard", rows=(row, row + n), cols=(0, inp),
                            A=ref(down.name, lambda a: a.reshape(r, inp)),  # (r, in[, kh, kw]) -> (r, in·kh·kw)
                            B=ref(up.name, lambda b, n=n: b.reshape(n, r))))  # (out, r[, 1, 1]) -> (out, r)
        row += n
    if split:
        tinfo["split_dims"] = [b.n_rows for b in blocks]
    return Target(key=key, layout=layout, shape=shape, blocks=tuple(blocks), info=tinfo)


# ---- writer --------------------------------------------------------------------------------------------

def kohya_name(t: Target, prefix: str) -> str:
    """The kohya module name of a target: the one it was read with, or prefix + module path underscored."""
    name = t.info.get("kohya_name")
    if isinstance(name, str) and name and "." not in name:
        return name
    if not t.key.endswith(".weight"):
        raise UnsupportedError(f"target \"{escape(t.key)}\": kohya adapts modules, so a LoRA target key must end in "
                               "\".weight\"")
    module = t.key[: -len(".weight")]
    if "." not in module and module.startswith(PREFIXES):
        return module  # a kohya name kept as the key (read without a base), whose target info was not kept
    return prefix + module.replace(".", "_")


def holds(t: Target) -> bool:
    """Whether kohya holds a lora target as it is: one pair over the whole weight, or split_dims (lora_flux.py):
    equal-rank pairs of one scale (one alpha per module) tiling a Linear's rows in order. Others are folded
    into one pair first (ops/fold.py), which every kohya reader (A1111, ComfyUI, sd-scripts) loads."""
    if t.is_whole or t.kind in FACTORED_KINDS:
        return True
    out, inp = t.matrix_shape
    blocks = sorted(t.blocks, key=lambda b: b.rows)
    return len(blocks) > 1 and t.layout == "linear" and all(b.cols == (0, inp) for b in blocks) and \
        blocks[0].rows[0] == 0 and blocks[-1].rows[1] == out and \
        all(a.rows[1] == b.rows[0] for a, b in zip(blocks, blocks[1:])) and \
        len({b.rank for b in blocks}) == 1 and len({b.scale for b in blocks}) == 1


def plan(adapter: Adapter, prefix: str = "lora_unet_") -> dict:
    """name -> tensor expressing `adapter` exactly in kohya's format (alpha chosen so each scale is unchanged).

    Factors may be numpy arrays or torch tensors; the tensors returned are numpy arrays.

    Raises:
        UnsupportedError: a target kohya cannot express (fan_in_fan_out, embedding, full, column or
            overlapping blocks), with the reason.
    """
    import numpy as np

    adapter = adapter.as_numpy()
    tensors: dict = {}
    seen: dict[str, str] = {}
    for t in adapter:
        where = f"target \"{escape(t.key)}\""
        if t.kind == "full":
            raise UnsupportedError(f"{where} is a whole-tensor delta; kohya LoRA files hold only lora_down/lora_up "
                                   "pairs, so the conversion cannot be exact")
        if t.layout == "fan_in_fan_out":
            raise UnsupportedError(f"{where} is a transposed (fan_in_fan_out, GPT-2 Conv1D) weight; kohya tools apply "
                                   "up @ down to weights stored (out, in), so the conversion cannot be exact")
        if t.layout == "embedding":
            raise UnsupportedError(f"{where} is an embedding; kohya LoRA has no embedding factors, so the conversion "
                                   "cannot be exact")
        name = kohya_name(t, prefix)
        if name in seen:
            raise UnsupportedError(f"{where} and \"{escape(seen[name])}\" both become kohya name \"{escape(name)}\"; "
                                   "underscores make them collide")
        seen[name] = t.key
        if t.kind in FACTORED_KINDS:  # LoHa, LoKr, LoCon-Tucker: LyCORIS's names (io/lycoris.py)
            tensors.update(lycoris.plan_target(t, name, where))
            continue
        if not holds(t):
            raise UnsupportedError(f"{where} has {len(t.blocks)} block(s) that are neither one pair over the whole "
                                   "weight nor split_dims row slices of a Linear with one rank and one scale; fold it "
                                   "first (ops.fold.fold_target, which loratool.save and every command do)")
        blocks = sorted(t.blocks, key=lambda b: b.rows)
        b0 = blocks[0]
        alpha = b0.alpha if b0.scale_rule == "standard" else alpha_for_scale(b0.scale, b0.rank, "standard")
        if not math.isfinite(alpha):
            raise NumericError(f"{where}: alpha {alpha} is not finite")
        k = tuple(t.shape[1:]) if t.layout == "conv" else ()
        for i, b in enumerate(blocks):
            tag = "" if len(blocks) == 1 else f".{i}"
            down = b.A.reshape(b.rank, *k) if k else b.A  # (r, in[, kh, kw])
            up = b.B.reshape(b.n_rows, b.rank, *([1] * len(k[1:]))) if k else b.B  # (out, r[, 1, 1])
            tensors[f"{name}.lora_down{tag}.weight"] = down
            tensors[f"{name}.lora_up{tag}.weight"] = up
        # float32 like sd-scripts' own files, unless that would round alpha (an rsLoRA conversion gives
        # alpha = scale * r, rarely a float32): then float64, which every reader's .item()/.float() accepts.
        exact32 = float(np.float32(alpha)) == alpha
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32 if exact32 else np.float64)
        if t.magnitude is not None:  # DoRA: LyCORIS's dora_scale
            if len(blocks) != 1:
                raise UnsupportedError(f"{where} is DoRA on split_dims pairs, which LyCORIS does not define")
            tensors.update(lycoris.plan_target(t, name, where))
    return tensors


def save(adapter: Adapter, path, *, prefix: str = "lora_unet_", overwrite: bool = True) -> int:
    """Write `adapter` as a kohya `.safetensors` atomically. Returns the bytes written.

    Targets read from kohya keep their names; others become `prefix` + module path with "." -> "_".
    The caller checks the output against its inputs (fsutil.check_output).

    Raises:
        SpecError: a factor was never loaded or is not floating point.
        UnsupportedError: the adapter cannot be expressed in kohya's format exactly.
        NumericError: a factor or alpha is not finite.
    """
    import numpy as np

    numpy_tensors(tensors_of(adapter), path)  # every factor loaded and floating point
    tensors = plan(adapter, prefix)
    for n, x in tensors.items():
        if not bool(np.isfinite(x).all()):
            raise NumericError(f"{path}: tensor \"{escape(n)}\" has non-finite values; refusing to write it")
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loratool.")}
    meta.update(_network_metadata(tensors, meta))
    return write_file(path, tensors, meta, overwrite=overwrite)


def _network_metadata(tensors: dict, meta: dict) -> dict:
    """sd-scripts' ss_network_dim / ss_network_alpha describing the file as written: the rank and alpha every
    module shares, or "Dynamic" (as sd-scripts writes for resized files) when they differ. A rescale or a
    resize changes them, so the values read from the input would describe another file."""
    import numpy as np

    if "ss_network_dim" not in meta and "ss_network_alpha" not in meta:
        return {}
    ranks = {int(x.shape[0]) for n, x in tensors.items() if n.endswith(".lora_down.weight")}
    alphas = {float(np.asarray(x, dtype=np.float64).reshape(-1)[0])
              for n, x in tensors.items() if n.endswith(".alpha")}

    def one(values):
        if len(values) != 1:
            return "Dynamic"
        v = next(iter(values))
        return str(int(v)) if float(v).is_integer() else repr(float(v))

    return {"ss_network_dim": one(ranks), "ss_network_alpha": one(alphas)}


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def _detect(src: Source) -> int:
    if not (src.path.suffix == ".safetensors" and src.path.is_file()):
        return 0
    names = src.header().tensors
    # LyCORIS files share these names; the kohya reader names and refuses them.
    if any(".lora_down." in n or ".lora_up." in n or n.endswith(".alpha") for n in names) or \
            any(n.startswith(KOHYA_PREFIXES) for n in names):
        return 50
    return 0


DIALECT = Dialect(
    name="kohya", description="a kohya/sd-scripts LoRA .safetensors file (lora_down/lora_up/alpha)",
    detect=_detect, structure=structure, load=load,
    options=frozenset({"base", "allow_unknown", "allow_partial", "problems"}),
    reads=(".safetensors",), save=save, writes="file", suffix=".safetensors",
    save_options=frozenset({"prefix", "overwrite"}), holds=holds,
    kinds=frozenset({"lora", "full", "dora", "loha", "lokr", "tucker"}))

__all__ = ["load", "save", "structure", "plan", "holds", "kohya_name", "strip_prefix", "DIALECT"]
