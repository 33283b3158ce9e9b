"""ComfyUI "original key" LoRA files: one `.safetensors` keyed by the model's own module paths

    diffusion_model.<path>.lora_up.weight / .lora_down.weight    (out, r[, 1, 1]) / (r, in[, kh, kw])
    diffusion_model.<path>.lora_B.weight  / .lora_A.weight       the same pair, PEFT's names
    diffusion_model.<path>.alpha       0-d: scale = alpha / r (r = rows of the down factor); missing: scale 1
    diffusion_model.<path>.diff        a whole ΔW of the weight's shape, added as it is
    diffusion_model.<path>.diff_b      a whole ΔW of the layer's bias, added as it is
    text_encoders.<name>.<path>.…      the same for a text encoder (clip_l, clip_g, t5xxl, ...)

This is the "generic lora format without any weird key names" ComfyUI maps every `diffusion_model.*.weight`
and `text_encoders.*.weight` key of its models to (comfy/lora.py model_lora_keys_unet / _clip), and what its
own LoRA extractor writes. The math (comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight, comfy/lora.py
calculate_weight): W += strength · (alpha / r) · (up.flatten(1) @ down.flatten(1)).reshape(W.shape), alpha / r
replaced by 1 without `.alpha`; a "diff" patch adds strength · diff. So a pair is a "linear" or "conv" target
on `<path>.weight`, a `.diff` a "full" target with scale 1, a `.diff_b` a "full" target on `<path>.bias`.
LyCORIS `.w_norm` / `.b_norm` are diffs of a norm layer's weight and bias (calculate_weight: "diff") and are
read as such.

Refused, with the kind named: `.set_weight` (a replacement, not a delta: its delta depends on the base), a
Tucker `lora_mid`, `reshape_weight` (the base is padded first), DoRA `dora_scale`, LoHa, LoKr, GLoRA, OFT.

Target keys are `<prefix><path>.weight` (`diffusion_model.…`); with a base they resolve to the one base key
equal to it or differing by a leading prefix (a checkpoint's `model.diffusion_model.…`, a bare diffusion model
file's `…`).
"""

from __future__ import annotations

import math
import re

from ..adapter import Adapter, Block, Target, alpha_for_scale
from ..container import escape, read_scalars, write_file
from ..errors import MismatchError, NumericError, SpecError, UnsupportedError
from ._common import (Dialect, Meta, Source, as_source, base_keys, check_unknown, deferred, header_only,
                      materialize, metas_of_header, ref, safetensors_reader)
from .native import _check_finite, numpy_tensors, tensors_of

PREFIXES = ("diffusion_model.", "text_encoders.")
NAME = re.compile(r"^(?P<m>(?:diffusion_model|text_encoders)\..+?)\.(?P<part>lora_up\.weight|lora_down\.weight|"
                  r"lora_B\.weight|lora_A\.weight|alpha|diff|diff_b|w_norm|b_norm)$", re.S)
FACTOR = {"lora_up.weight": "up", "lora_B.weight": "up", "lora_down.weight": "down", "lora_A.weight": "down"}
# Keys of other kinds ComfyUI also loads (comfy/weight_adapter/): recognised and refused with the reason.
REFUSED = (
    (re.compile(r"\.set_weight$"), "is a replacement weight (\"set\" patch), not a delta; its ΔW depends on the base"),
    (re.compile(r"\.lora_mid\.weight$"), "is a Tucker (LoCon CP) core; its delta is not up @ down"),
    (re.compile(r"\.reshape_weight$"), "pads the base weight to another shape before the LoRA is added"),
    (re.compile(r"\.dora_scale$"), "is a DoRA magnitude"),
    (re.compile(r"\.hada_\w+$"), "is a LyCORIS LoHa factor (Hadamard product)"),
    (re.compile(r"\.lokr_\w+$"), "is a LyCORIS LoKr factor (Kronecker product)"),
    (re.compile(r"\.oft_\w+$"), "is an OFT factor (multiplicative)"),
    (re.compile(r"\.[ab][12]\.weight$"), "is a GLoRA factor"),
)
ALPHA_MISSING = "missing; scale 1 (alpha = rank), as ComfyUI does"


def structure(path, *, base=None, allow_unknown: bool = False) -> Adapter:
    """The adapter of a ComfyUI file (every factor None) from its header and 0-d `.alpha` tensors; no torch.

    Args and Raises: as `load`.
    """
    return header_only(_plan(path, base, allow_unknown, then=lambda adapter, read: adapter))


def load(path, *, base=None, allow_unknown: bool = False, lazy: bool = False) -> Adapter:
    """Read a ComfyUI "original key" LoRA `.safetensors` with its tensors, as numpy arrays (no torch).

    Args:
        path: the file (or a Source of it).
        base: base model (path or io.base.BaseModel): resolves keys under a leading prefix, checks shapes.
        allow_unknown: record keys that are not ComfyUI LoRA tensors in info["unknown_keys"] instead of failing.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`).
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, key and fix in the message.
    """
    return _plan(path, base, allow_unknown, then=deferred if lazy else materialize)


def _plan(path, base, allow_unknown, then):
    src = as_source(path)
    hdr = src.checked_header()
    with base_keys(base) as bk:
        adapter = _build(src.path, metas_of_header(hdr), dict(hdr.metadata),
                         lambda names: read_scalars(src.path, hdr, names), bk, allow_unknown)
        return then(adapter, safetensors_reader(src.path, hdr))


def _refuse(path, key: str) -> None:
    for pattern, why in REFUSED:
        if pattern.search(key):
            raise UnsupportedError(f"{path}: \"{escape(key)}\" {why}; loratool reads plain LoRA pairs, .diff and "
                                   ".diff_b only")


def _build(path, metas, meta, read_alphas, bk, allow_unknown) -> Adapter:
    modules: dict[str, dict[str, Meta]] = {}
    unknown = []
    for key, x in metas.items():
        _refuse(path, key)
        m = NAME.match(key)
        if m is None:
            unknown.append(key)
            continue
        part = FACTOR.get(m["part"], {"w_norm": "diff", "b_norm": "diff_b"}.get(m["part"], m["part"]))
        d = modules.setdefault(m["m"], {})
        if part in d:
            raise SpecError(f"{path}: \"{escape(key)}\" and \"{escape(d[part].name)}\" are the same part of module "
                            f"\"{escape(m['m'])}\"; keep one")
        d[part] = x
    alphas = read_alphas({d["alpha"].name for d in modules.values() if "alpha" in d and d["alpha"].numel == 1
                          and d["alpha"].is_float})
    targets: dict[str, Target] = {}
    for module, d in sorted(modules.items()):
        for t in _targets(path, module, d, alphas, bk):
            if t.key in targets:
                raise SpecError(f"{path}: two modules map to base key \"{escape(t.key)}\"")
            targets[t.key] = t
    info: dict = {"dialect": "comfy"}
    missing = sum(1 for t in targets.values() if t.info.get("alpha") == ALPHA_MISSING)
    if missing:
        info["alpha_defaulted"] = f"{missing} pair(s) without .alpha: scale 1, as ComfyUI does"
    check_unknown(path, "ComfyUI", unknown, allow_unknown, info)
    return Adapter(targets=targets, metadata=meta, info=info)


def _resolve(path, bk, key, shape, where):
    if bk is None:
        return key
    key = bk.resolve_dotted(key, where)
    have = bk.shape(key)
    if have != tuple(shape):
        raise MismatchError(f"{where}: implies {list(shape)} but base \"{escape(key)}\" is {list(have)}")
    return key


def _targets(path, module, d, alphas, bk) -> list[Target]:
    shown = escape(module)
    where = f"{path}: module \"{shown}\""
    out = []
    if ("up" in d) != ("down" in d):
        raise SpecError(f"{where} has {'lora_up' if 'up' in d else 'lora_down'} without its pair; a LoRA module "
                        "needs both")
    if "up" in d and "diff" in d:
        raise SpecError(f"{where} has both a LoRA pair and a .diff for its weight; ComfyUI applies only the last, "
                        "so refusing to guess")
    if "alpha" in d and "up" not in d:
        raise SpecError(f"{where} has .alpha but no LoRA pair")
    for part in ("diff", "diff_b"):
        if part in d:
            x = d[part]
            if not x.is_float:
                raise SpecError(f"{where}: .{part} is {x.dtype}; a delta is floating point")
            key = module + (".weight" if part == "diff" else ".bias")
            key = _resolve(path, bk, key, x.shape, where)
            out.append(Target(key=key, kind="full", layout="full", shape=tuple(x.shape), delta=ref(x.name),
                              delta_scale=1.0, info={"comfy": part}))
    if "up" not in d:
        return out
    up, down = d["up"], d["down"]
    if not (up.is_float and down.is_float):
        raise SpecError(f"{where}: factors are {up.dtype}/{down.dtype}, not floating point")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
            any(k != 1 for k in up.shape[2:]):
        raise SpecError(f"{where}: down {list(down.shape)} and up {list(up.shape)} are not a LoRA pair (2-D, or conv "
                        "with a 1x1 up)")
    r, n = int(down.shape[0]), int(up.shape[0])
    tinfo: dict = {"comfy_factors": "lora_A" if up.name.endswith(".lora_B.weight") else "lora_down"}
    if "alpha" in d:
        a = d["alpha"]
        if a.numel != 1 or not a.is_float:
            raise SpecError(f"{path}: \"{escape(a.name)}\" has shape {list(a.shape)} ({a.dtype}); alpha is one number")
        alpha = alphas[a.name]
        if not math.isfinite(alpha):
            raise SpecError(f"{path}: \"{escape(a.name)}\" is {alpha}; alpha must be finite")
        tinfo["comfy_alpha"] = True
    else:
        alpha = float(r)
        tinfo["alpha"] = ALPHA_MISSING
    shape = (n, *(int(s) for s in down.shape[1:]))
    conv = down.ndim == 4
    key = module + ".weight"
    if bk is not None:
        key = bk.resolve_dotted(key, where)
        have = bk.shape(key)
        if conv and down.shape[2:] == (1, 1) and have == shape[:2]:
            conv, shape = False, shape[:2]  # ComfyUI reshapes up @ down to the weight's shape: 1x1 onto a Linear
        if have != shape:
            raise MismatchError(f"{where}: factors imply weight {list(shape)} but base \"{escape(key)}\" is "
                                f"{list(have)}")
    inp = math.prod(shape[1:])
    block = Block(rank=r, alpha=float(alpha), scale_rule="standard", rows=(0, n), cols=(0, inp),
                  A=ref(down.name, lambda a: a.reshape(r, inp)),  # (r, in[, kh, kw]) -> (r, in·kh·kw)
                  B=ref(up.name, lambda b: b.reshape(n, r)))  # (out, r[, 1, 1]) -> (out, r)
    out.append(Target(key=key, layout="conv" if conv else "linear", shape=shape, blocks=(block,), info=tinfo))
    return out


# ---- writer --------------------------------------------------------------------------------------------

def _module(t: Target, suffix: str, prefix: str) -> str:
    if not t.key.endswith(suffix):
        raise UnsupportedError(f"target \"{escape(t.key)}\": ComfyUI names modules, so this target's key must end in "
                               f"\"{suffix}\"")
    m = t.key[: -len(suffix)]
    if m.startswith(PREFIXES):
        return m
    for p in PREFIXES:  # a checkpoint's `model.diffusion_model.…` key: keep the part ComfyUI maps
        i = m.find("." + p)
        if i >= 0:
            return m[i + 1:]
    return prefix + m


def plan(adapter: Adapter, prefix: str = "diffusion_model.") -> dict:
    """name -> tensor expressing `adapter` exactly as a ComfyUI "original key" file.

    Args:
        prefix: put before the module path of targets whose key holds no `diffusion_model.`/`text_encoders.`.
    Raises:
        UnsupportedError: a target ComfyUI cannot express (transposed or embedding layout, several blocks).
    """
    import numpy as np

    adapter = adapter.as_numpy()
    tensors: dict = {}
    for t in adapter:
        where = f"target \"{escape(t.key)}\""
        if t.kind == "full":
            bias = t.key.endswith(".bias")
            name = _module(t, ".bias" if bias else ".weight", prefix) + (".diff_b" if bias else ".diff")
            d = t.delta
            if t.delta_scale != 1.0:  # ComfyUI adds a diff as it is: fold the scale in (float64, cast back)
                d = (d.astype(np.float64) * t.delta_scale).astype(d.dtype)
            tensors[name] = d
            continue
        if t.layout in ("fan_in_fan_out", "embedding"):
            raise UnsupportedError(f"{where} is a transposed ({t.layout}) weight; ComfyUI adds up @ down reshaped to "
                                   "the weight, so the conversion cannot be exact")
        if not t.is_whole:
            raise UnsupportedError(f"{where} has {len(t.blocks)} block(s) that are not one pair over the whole weight; "
                                   "ComfyUI holds one pair per module, so the conversion cannot be exact")
        b = t.blocks[0]
        m = _module(t, ".weight", prefix)
        k = tuple(t.shape[1:]) if t.layout == "conv" else ()
        down = b.A.reshape(b.rank, *k) if k else b.A  # (r, in[, kh, kw])
        up = b.B.reshape(b.n_rows, b.rank, *([1] * len(k[1:]))) if k else b.B  # (out, r[, 1, 1])
        names = ("lora_A", "lora_B") if t.info.get("comfy_factors") == "lora_A" else ("lora_down", "lora_up")
        tensors[f"{m}.{names[0]}.weight"], tensors[f"{m}.{names[1]}.weight"] = down, up
        scale = b.scale
        if scale != 1.0 or t.info.get("comfy_alpha"):
            alpha = b.alpha if b.scale_rule == "standard" else alpha_for_scale(scale, b.rank, "standard")
            exact32 = float(np.float32(alpha)) == alpha
            tensors[f"{m}.alpha"] = np.array(alpha, dtype=np.float32 if exact32 else np.float64)
    return tensors


def save(adapter: Adapter, path, *, comfy_prefix: str = "diffusion_model.", overwrite: bool = True) -> int:
    """Write `adapter` as a ComfyUI "original key" `.safetensors`, atomically. Returns the bytes written.

    Args:
        comfy_prefix: see `plan`'s `prefix`.
    Raises:
        SpecError: a factor was never loaded or is not floating point.
        UnsupportedError: the adapter cannot be expressed exactly (the message says which target and why).
        NumericError: a factor or alpha is not finite.
    """
    import numpy as np

    numpy_tensors(tensors_of(adapter), path)
    adapter = adapter.as_numpy()
    _check_finite(adapter, tensors_of(adapter), str(path))
    tensors = plan(adapter, comfy_prefix)
    for n, x in tensors.items():
        if not bool(np.isfinite(x).all()):
            raise NumericError(f"{path}: tensor \"{escape(n)}\" has non-finite values; refusing to write it")
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(("loratool.", "peft."))}
    return write_file(path, tensors, meta, overwrite=overwrite)


def _detect(src: Source) -> int:
    if not (src.path.suffix == ".safetensors" and src.path.is_file()):
        return 0
    names = src.header().tensors
    # Above kohya (50) and PEFT's bare file (40): neither names keys diffusion_model. or text_encoders.
    return 60 if any(NAME.match(n) or (n.startswith(PREFIXES) and any(p.search(n) for p, _ in REFUSED))
                     for n in names) else 0


DIALECT = Dialect(
    name="comfy", description="a ComfyUI \"original key\" LoRA .safetensors file (diffusion_model./text_encoders. "
                              "+ lora_up/lora_down/alpha, diff, diff_b)",
    detect=_detect, structure=structure, load=load, options=frozenset({"base", "allow_unknown"}),
    reads=(".safetensors",), save=save, writes="file", suffix=".safetensors",
    save_options=frozenset({"comfy_prefix", "overwrite"}))

__all__ = ["load", "save", "structure", "plan", "DIALECT"]
