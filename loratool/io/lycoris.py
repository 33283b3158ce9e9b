"""LyCORIS modules in kohya naming (lycoris-lora `modules/locon.py`, `loha.py`, `lokr.py`): the part of the
kohya dialect (io/kohya.py) that reads and writes LoHa, LoKr, LoCon with a Tucker core, and DoRA.

    <name>.hada_w1_a (out, r)  .hada_w1_b (r, in·k)  .hada_w2_a  .hada_w2_b          LoHa
    <name>.hada_t1 (r, r, *k)  .hada_t2  with .hada_w?_a (r, out), .hada_w?_b (r, in)    LoHa, Tucker
    <name>.lokr_w1 (a, c) | .lokr_w1_a (a, r) .lokr_w1_b (r, c)                       LoKr, first factor
    <name>.lokr_w2 (b, d[, *k]) | .lokr_w2_a (b, r) .lokr_w2_b (r, d[·k])             LoKr, second factor
    <name>.lokr_t2 (r, r, *k)  with .lokr_w2_a (r, b), .lokr_w2_b (r, d)                LoKr, Tucker
    <name>.lora_down.weight (r, in, 1, 1) .lora_mid.weight (r, r, *k) .lora_up.weight (out, r, 1, 1)  LoCon Tucker
    <name>.dora_scale  (out, 1[, 1, …]) per output row (wd_on_out) | (1, in[, 1, …]) per input channel   DoRA
    <name>.alpha       0-d; missing or 0 means alpha = r (scale 1), as LyCORIS does

Scale (ops/kinds.py): alpha / r for LoHa and LoCon; for LoKr alpha / r when a factor is decomposed (r = the
rank of w2's pair, else w1's, as ComfyUI reads it; two decomposed factors of different ranks are refused) and 1
when both factors are whole (LyCORIS sets alpha = dim then). The DoRA norm adds float32 eps (LyCORIS's
weight_decompose adds torch.finfo(dtype).eps of the magnitude's dtype).
"""

from __future__ import annotations

import math

from ..adapter import Target
from ..container import escape
from ..errors import NumericError, SpecError, UnsupportedError
from ..kind_shapes import loha_shape, lokr_shape, tucker_shape
from ._common import ref, refusal

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
OTHER = ("lora_mid.weight", "dora_scale")
SUFFIXES = LOHA + LOKR + OTHER
# file name -> factor name in Target.factors
FACTOR = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1",
          "hada_t2": "t2", "lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2",
          "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2"}
EPS = {"F32": 1.1920928955078125e-07, "F64": 2.220446049250313e-16, "F16": 0.0009765625, "BF16": 0.0078125}


def kind_of(lyc: dict, has_pair: bool) -> str | None:
    """The kind a module's LyCORIS tensors make: "loha", "lokr", "tucker" (lora_mid), or "dora" (a plain
    pair with dora_scale); None for a plain kohya pair."""
    if any(k in lyc for k in LOHA):
        return "loha"
    if any(k in lyc for k in LOKR):
        return "lokr"
    if "lora_mid.weight" in lyc:
        return "tucker"
    if "dora_scale" in lyc:
        return "dora" if has_pair else None
    return None


def _bad(path, name, what) -> SpecError:
    return refusal(SpecError, "K008", f"{path}: module \"{escape(name)}\": {what}", name)


def factors_of(path, name: str, kind: str, lyc: dict, d: dict):
    """(factors name -> Meta, shape of the weight the factors imply, rank r or 0, both whole (LoKr)).

    Raises:
        SpecError (K008): a factor is missing, not floating point, or the shapes do not fit together.
    """
    if kind == "tucker":
        downs, ups = d["down"], d["up"]
        if set(downs) != {-1} or set(ups) != {-1}:
            raise _bad(path, name, "lora_mid.weight needs one lora_down.weight and one lora_up.weight")
        got = {"down": downs[-1], "mid": lyc["lora_mid.weight"], "up": ups[-1]}
    else:
        got = {FACTOR[k]: m for k, m in lyc.items() if k in FACTOR}
    for m in got.values():
        if not m.is_float:
            raise _bad(path, name, f"\"{escape(m.name)}\" is {m.dtype}, not floating point")
    S = {k: m.shape for k, m in got.items()}
    try:
        if kind == "loha":
            return got, *loha_shape(S), False
        if kind == "lokr":
            return got, *lokr_shape(S)
        down, up = S["down"], S["up"]  # (r, in, 1, 1) and (out, r, 1, 1) in a file: the 1x1 dims dropped
        if len(down) != len(S["mid"]) or len(up) != len(S["mid"]) or any(x != 1 for x in down[2:] + up[2:]):
            raise ValueError
        return got, *tucker_shape({**S, "down": down[:2], "up": up[:2]}), False
    except (KeyError, ValueError, IndexError):
        listing = ", ".join(f"{k} {list(v)}" for k, v in sorted(S.items()))
        raise _bad(path, name, f"{kind} factors do not fit together ({listing}); see lycoris-lora's "
                   f"modules/{'locon' if kind == 'tucker' else kind}.py for their shapes") from None


def dora_of(path, name: str, m, shape) -> tuple[str, float]:
    """(axis, eps) of a LyCORIS dora_scale of shape (out, 1, …) or (1, in, …) for a weight of `shape`.

    Raises:
        SpecError (K008): the shape fits neither axis, or the dtype is not floating point.
    """
    if not m.is_float:
        raise _bad(path, name, f"dora_scale is {m.dtype}, not floating point")
    # The weight may be known only flat (out, in·k) until a base gives its kernel, so trailing 1s of any count.
    if len(m.shape) >= 1 and m.shape[0] == shape[0] and all(x == 1 for x in m.shape[1:]):
        return "out", EPS.get(m.dtype, EPS["F32"])
    if len(shape) >= 2 and len(m.shape) >= 2 and m.shape[0] == 1 and all(x == 1 for x in m.shape[2:]) and \
            (m.shape[1] == shape[1] or (len(shape) == 2 and len(m.shape) > 2 and shape[1] % m.shape[1] == 0)):
        return "in", EPS.get(m.dtype, EPS["F32"])
    raise _bad(path, name, f"dora_scale {list(m.shape)} is neither ({shape[0]}, 1, …) nor (1, "
               f"{shape[1] if len(shape) > 1 else '?'}, …) for a weight {list(shape)}")


def lazy_factors(kind: str, got: dict) -> dict:
    """The factors as Lazy references (LoCon Tucker up/down squeezed to (out, r) and (r, in))."""
    if kind == "tucker":
        return {"up": ref(got["up"].name, lambda u: u.reshape(u.shape[0], u.shape[1])),
                "mid": ref(got["mid"].name),
                "down": ref(got["down"].name, lambda x: x.reshape(x.shape[0], x.shape[1]))}
    return {k: ref(m.name) for k, m in got.items()}


def scale_for(kind: str, alpha: float, r: int, both_whole: bool) -> float:
    """The scale rule of LyCORIS (module docstring): alpha / r, or 1 for a LoKr of two whole factors."""
    if kind == "lokr" and both_whole:
        return 1.0
    return alpha / r


# ---- writer --------------------------------------------------------------------------------------------

def plan_target(t: Target, name: str, where: str) -> dict:
    """name -> numpy array of one LyCORIS target in kohya naming (the factors as they were read, alpha chosen
    so the scale is unchanged, dora_scale in LyCORIS's shape).

    Raises:
        UnsupportedError: a LoKr of two whole factors with a scale other than 1 (LyCORIS ignores its alpha); a
            DoRA whose eps is not LyCORIS's for its dtype (PEFT's DoRA, eps 0).
        NumericError: the alpha is not finite.
    """
    import numpy as np

    out: dict = {}
    f = t.factors
    if t.kind == "tucker":
        k = f["mid"].ndim - 2
        out[f"{name}.lora_up.weight"] = f["up"].reshape(*f["up"].shape, *([1] * k))
        out[f"{name}.lora_mid.weight"] = f["mid"]
        out[f"{name}.lora_down.weight"] = f["down"].reshape(*f["down"].shape, *([1] * k))
    elif t.kind in ("loha", "lokr"):
        prefix = "hada_" if t.kind == "loha" else "lokr_"
        for k, v in f.items():
            if v is not None:
                out[f"{name}.{prefix}{k[:2]}{'_' + k[2:] if len(k) > 2 else ''}"] = v
    r = t.rank
    if t.kind == "lokr" and r == 0:
        if t.delta_scale != 1.0:
            raise UnsupportedError(f"{where} is a LoKr of two whole factors with scale {t.delta_scale:g}; LyCORIS "
                                   "ignores the alpha of such a module (scale 1), so a LyCORIS file cannot hold it; "
                                   "write the loratool format, or convert it to LoRA (--rank)")
        alpha = float(t.info.get("lycoris_alpha", 1.0))
    elif t.kind == "dora":
        alpha = None  # the pair's alpha is written by the kohya writer
    else:
        stored = t.info.get("lycoris_alpha")
        alpha = float(stored) if isinstance(stored, (int, float)) and stored / r == t.delta_scale \
            else t.delta_scale * r
    if alpha is not None:
        if not math.isfinite(alpha):
            raise NumericError(f"{where}: alpha {alpha} is not finite")
        out[f"{name}.alpha"] = np.array(alpha, dtype=np.float32 if float(np.float32(alpha)) == alpha else np.float64)
    if t.magnitude is not None:
        m = t.magnitude
        from ..dtypes import st_name

        eps = EPS.get(st_name(m.dtype), EPS["F32"])  # as dora_of reads it back
        if t.dora_eps != eps:  # PEFT's DoRA has none; LyCORIS and ComfyUI add finfo(dora_scale.dtype).eps
            raise UnsupportedError(
                f"{where} is DoRA whose norm adds eps {t.dora_eps:g} (PEFT adds none), but LyCORIS and ComfyUI add "
                f"{eps:g} to the norm of a {st_name(m.dtype)} dora_scale; m / ‖W + ΔW‖ equals m' / (‖W + ΔW‖ + eps) "
                "only for an m' that depends on the base, so the conversion cannot be exact; keep it in PEFT's "
                "format, or merge it")
        ones = [1] * (len(t.shape) - 1)
        kept = t.info.get("dora_scale_shape")
        if isinstance(kept, (list, tuple)) and math.prod(kept) == m.size:  # the shape it was read with
            out[f"{name}.dora_scale"] = m.reshape(tuple(kept))
        elif t.dora_axis == "out":
            out[f"{name}.dora_scale"] = m.reshape(t.shape[0], *ones)
        else:
            out[f"{name}.dora_scale"] = m.reshape(1, t.shape[1], *ones[1:])
    return out


__all__ = ["SUFFIXES", "kind_of", "factors_of", "dora_of", "lazy_factors", "scale_for", "plan_target"]
