"""PEFT `target_parameters`: LoRA on nn.Parameters, such as transformers 5's fused MoE expert tensors.

Read from peft 0.21 (tuners/lora/layer.py ParamWrapper, tuners/tuners_utils.py _inject_parameters):

- Each targeted parameter is wrapped by one ParamWrapper around its module; several parameters of one module
  nest, the first one registered (in the module's parameter order) innermost. The saved keys name the module,
  not the parameter: `<module>.lora_A.weight` for the outermost, `<module>.base_layer.lora_A.weight` for the
  one inside it, and so on. transformers' expert modules register `gate_up_proj` before `down_proj`.
- A 3-D parameter (E, d1, d2) has lora_A (E·r, in) and lora_B (out, E·r), r being the rank of each expert:
  expert e's A is rows [e·r, (e+1)·r) of lora_A, its B the columns e, e + E, e + 2E, ... of lora_B
  (`reshape(out, r, E)`). Its ΔW[e] = s·B_e @ A_e (out, in), with s = lora_alpha / r (or / sqrt(r)). Unless the
  module is `is_transposed` (gpt-oss), PEFT swaps in and out: the parameter is (E, out, in) (layout "experts");
  otherwise (E, in, out) and ΔW[e] is transposed (layout "experts_t").
- A 2-D parameter is a plain (out, in) weight: lora_A (r, in), lora_B (out, r).
- ParamWrapper refuses dropout, fan_in_fan_out, lora_bias, DoRA and other variants, so none of them is read here.
"""

from __future__ import annotations

from ..adapter import Block, Target, expert_span
from ..container import escape
from ..errors import MismatchError, SpecError
from ._common import Lazy, refusal
from .experts import fused_layout

# The order transformers' expert modules register their parameters (the first is PEFT's innermost wrapper).
REGISTRATION = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
# auto_mapping.base_model_class prefixes of models whose expert modules are `is_transposed` (E, in, out).
TRANSPOSED_CLASSES = ("GptOss", "Aria", "OpenAIPrivacyFilter")


def split(module: str) -> tuple[str, int]:
    """(the module without its `.base_layer` segments, how many there were: the wrapper's depth)."""
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    return module, depth


def parameters_of(cfg: dict, module: str) -> list[str]:
    """The names of `module`'s parameters the config targets, in registration order (innermost first)."""
    names = []
    for entry in cfg.get("target_parameters") or []:
        mod, _, param = str(entry).rpartition(".")
        if (module == mod or module.endswith("." + mod)) and param not in names:
            names.append(param)
    known = [n for n in REGISTRATION if n in names]
    return known + [n for n in names if n not in known]


def is_parameter_module(cfg: dict, module: str) -> bool:
    return bool(parameters_of(cfg, split(module)[0]))


def target(where, module: str, A, B, cfg: dict, rank_of, alpha_of, rule: str, bk) -> Target:
    """The Target of one ParamWrapper's factors (Meta of lora_A.weight and lora_B.weight).

    Args:
        rank_of, alpha_of: parameter key (`<module>.<parameter>`) -> its r and lora_alpha after rank_pattern and
            alpha_pattern (PEFT matches the patterns on that key).
    Raises:
        SpecError: factor shapes that are no ParamWrapper's. MismatchError: the base has no such parameter, or
            another shape.
    """
    root, depth = split(module)
    names = parameters_of(cfg, root)
    candidates = [n for n in names if bk is None or bk.shape(_key(bk, root, n)) is not None] if bk else names
    shown = escape(module)
    if depth >= len(candidates):
        raise refusal(MismatchError, "B001", f"{where}: module \"{shown}\" is wrapper {depth + 1} of {root}'s "
                      f"targeted parameters, which are {candidates}; check target_parameters and the base", module)
    param = candidates[len(candidates) - 1 - depth]
    key = f"{root}.{param}" if bk is None else _key(bk, root, param)
    r, alpha = rank_of(f"{root}.{param}"), alpha_of(f"{root}.{param}")
    if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] % r or B.shape[1] != A.shape[0]:
        raise refusal(SpecError, "P012", f"{where}: module \"{shown}\" ({param}): lora_A {list(A.shape)} and lora_B "
                      f"{list(B.shape)} are not ParamWrapper factors of rank {r} per expert", module)
    E, inp, out = A.shape[0] // r, int(A.shape[1]), int(B.shape[0])
    have = None if bk is None else bk.shape(key)
    if have is not None and len(have) == 2 or (have is None and E == 1 and not _fused_name(param)):
        shape = (out, inp)
        if have is not None and tuple(have) != shape:
            raise refusal(MismatchError, "B002", f"{where}: module \"{shown}\": factors imply {param} {list(shape)} but "
                          f"the base has {list(have)}", module)
        block = Block(rank=r, alpha=alpha, scale_rule=rule, rows=(0, out), cols=(0, inp), A=_ref(A), B=_ref(B))
        return Target(key=key, layout="linear", shape=shape, blocks=(block,), info={"peft": "target_parameters"})
    layout = _orientation(cfg, bk, root, have, E, inp, out)
    shape = (E, out, inp) if layout == "experts" else (E, inp, out)
    if have is not None and tuple(have) != shape:
        raise refusal(MismatchError, "B002", f"{where}: module \"{shown}\": factors imply {param} {list(shape)} "
                      f"({E} experts of rank {r}) but the base has {list(have)}", module)
    blocks = []
    for e in range(E):
        rows, cols = expert_span(layout, shape, e)
        blocks.append(Block(rank=r, alpha=alpha, scale_rule=rule, rows=rows, cols=cols,
                            A=_ref(A, lambda a, e=e: a[e * r:(e + 1) * r]),  # (r, in)
                            B=_ref(B, lambda b, e=e: b[:, e::E])))  # (out, r), expert e's columns
    return Target(key=key, layout=layout, shape=shape, blocks=tuple(blocks),
                  info={"peft": "target_parameters", "experts": E})


def _key(bk, root: str, param: str) -> str:
    key = f"{root}.{param}"
    if key in bk.keys:
        return key
    hits = sorted(k for k in bk.keys if k.endswith("." + key) or key.endswith("." + k))
    return hits[0] if len(hits) == 1 else key


def _fused_name(param: str) -> bool:
    return param in REGISTRATION


def _orientation(cfg, bk, root, have, E, inp, out) -> str:
    """"experts" (E, out, in) unless the base's shapes, its gpt-oss pair, or the adapter's model class say
    (E, in, out)."""
    if have is not None and tuple(have) != (E, inp, out):
        return "experts"
    if have is not None and tuple(have) != (E, out, inp):
        return "experts_t"
    if bk is not None:
        module = _key(bk, root, "down_proj").rsplit(".", 1)[0]
        found = fused_layout(bk.base.info, module)
        if found is not None:
            return found
    cls = str((cfg.get("auto_mapping") or {}).get("base_model_class") or "")
    return "experts_t" if cls.startswith(TRANSPOSED_CLASSES) else "experts"


def _ref(meta, view=None) -> Lazy:
    name = meta.name
    return Lazy((name,), (lambda arrays: arrays[name]) if view is None else (lambda arrays: view(arrays[name])))


__all__ = ["target", "split", "parameters_of", "is_parameter_module", "REGISTRATION", "TRANSPOSED_CLASSES"]
