"""diffusers LoRA files (`pytorch_lora_weights.safetensors`): PEFT factors named by pipeline component

    <component>.<module>.lora_A.weight   (r, in) or conv (r, in, kh, kw)
    <component>.<module>.lora_B.weight   (out, r) or conv (out, r, 1, 1)

where <component> is `unet`, `transformer`, `text_encoder`, `text_encoder_2`, ... (the pipeline's attribute,
diffusers' `_pack_dict_with_prefix`) and <module> the module path inside that model. A model-level save
(`ModelMixin.save_lora_adapter`) writes the same names without a component. Older files name the factors
`<module>.lora.down.weight` / `.lora.up.weight` (LoRACompatibleLinear), `<module>.lora_linear_layer.down/up`
(text encoders), or `<attn>.processor.to_q_lora.down/up.weight` (attention processors); they are read as the
same pair.

Scale (diffusers/loaders/peft.py load_lora_adapter, utils/peft_utils.py get_peft_kwargs): the safetensors
header's `lora_adapter_metadata` is a JSON object of each component's PEFT LoraConfig with keys prefixed by
"<component>." (unprefixed for a model-level save): r, lora_alpha, use_rslora, rank_pattern, alpha_pattern
(pattern keys are module paths inside the component, matched as PEFT matches them). Without it, a module's
`<module>.alpha` tensor (files converted from kohya: network_alphas) gives alpha, and else alpha = rank
(scale 1), which diffusers applies.

Target keys are `<component>.<module>.weight`; with a base (a diffusers model folder, its
`diffusion_pytorch_model.safetensors`), a component whose modules the base holds is mapped to the base's keys
(the component prefix stripped) and the other components are left out and named in info["skipped_components"]
(merging a pipeline's LoRA into its unet folder merges the unet part).

DoRA (lora_magnitude_vector, use_dora) and the LyCORIS kinds diffusers also loads (LoKr, LoHa) are refused.
The per-component LoRA math is PEFT's, so the reader and writer reuse io/peft.py's.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

from ..adapter import Adapter, Target
from ..container import escape, loads_json, read_scalars, write_file
from ..errors import MismatchError, SpecError, UnsupportedError
from . import peft
from ._common import (Dialect, Meta, Source, as_source, base_keys, check_unknown, deferred, finite_number,
                      header_only, listing, materialize, metas_of_header, safetensors_reader)
from .native import _check_finite, numpy_tensors, tensors_of

METADATA_KEY = "lora_adapter_metadata"  # diffusers/loaders/lora_base.py LORA_ADAPTER_METADATA_KEY
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder",
              "image_encoder")
# Older spellings of a factor, rewritten to PEFT's `<module>.lora_A.weight` / `.lora_B.weight`.
OLD_FORMS = (
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj)_lora\."
                r"(?P<f>down|up)\.weight$", re.S), lambda m: m["m"] + "." + ("to_out.0" if m["p"] == "to_out" else m["p"])),
    (re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.(?P<f>down|up)\.weight$", re.S), lambda m: m["m"]),
)
ALPHA_KEY = re.compile(r"^(?P<m>.+)\.alpha$", re.S)
REFUSED = {
    "lora_magnitude_vector": "is a DoRA magnitude vector",
    "dora_scale": "is a DoRA magnitude vector",
    "lokr_": "is a LyCORIS LoKr factor (Kronecker product)",
    "hada_": "is a LyCORIS LoHa factor (Hadamard product)",
}


def _split(name: str) -> tuple[str, str]:
    """(component, rest): the leading pipeline component of a key, or "" when it has none."""
    head, dot, rest = name.partition(".")
    return (head, rest) if dot and head in COMPONENTS else ("", name)


def _canonical(name: str) -> str | None:
    """PEFT's spelling of a factor name (the name itself when it already is one), or None."""
    if peft.FACTOR_KEY.match(name):
        return name
    for pattern, module in OLD_FORMS:
        m = pattern.match(name)
        if m:
            return module(m) + (".lora_A.weight" if m["f"] == "down" else ".lora_B.weight")
    return None


def configs_of(path, metadata: dict) -> dict[str, dict]:
    """component -> its checked PEFT LoraConfig, from the header's lora_adapter_metadata ({} without it).

    Raises:
        SpecError: the metadata is not a JSON object of "<component>.<field>" (or "<field>") -> value, or a
            config breaks PEFT's rules (peft.check_config).
        UnsupportedError: a config is DoRA or not LoRA.
    """
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    where = f"{path}: {METADATA_KEY}"
    try:
        flat = loads_json(raw)
    except ValueError as e:
        raise SpecError(f"{where} is not valid JSON ({escape(str(e))})") from None
    if not isinstance(flat, dict):
        raise SpecError(f"{where} is not a JSON object")
    configs: dict[str, dict] = {}
    for k, v in flat.items():
        comp, field = _split(k)
        configs.setdefault(comp, {})[field] = v
    for comp, cfg in configs.items():
        cfg.setdefault("peft_type", "LORA")  # diffusers builds a LoraConfig from it whatever it holds
        if cfg.get("use_dora"):
            raise UnsupportedError(f"{where}: component \"{escape(comp)}\" is DoRA (use_dora); loratool reads plain "
                                   "LoRA diffusers files only")
        peft.check_config(cfg, f"{where} ({escape(comp) or 'model'})")
    return configs


def _sort(path, metas: dict):
    """(component -> canonical name inside it -> Meta, component -> module -> alpha Meta, unknown names)."""
    groups: dict[str, dict[str, Meta]] = {}
    alphas: dict[str, dict[str, Meta]] = {}
    unknown = []
    for name, x in metas.items():
        comp, rest = _split(name)
        for part, why in REFUSED.items():
            if part in rest:
                raise UnsupportedError(f"{path}: \"{escape(name)}\" {why}; loratool reads plain LoRA (lora_A/lora_B) "
                                       "diffusers files only")
        canon = _canonical(rest)
        if canon is not None:
            if canon in groups.setdefault(comp, {}):
                raise SpecError(f"{path}: \"{escape(name)}\" and another key spell the same factor "
                                f"\"{escape(canon)}\"")
            groups[comp][canon] = x
            continue
        m = ALPHA_KEY.match(rest)
        if m and x.numel == 1 and x.is_float:
            alphas.setdefault(comp, {})[m["m"]] = x
            continue
        unknown.append(name)
    return groups, alphas, unknown


def _implied_config(path, comp, group: dict, alpha_values: dict) -> tuple[dict, bool]:
    """The LoraConfig diffusers builds for a component without metadata (get_peft_kwargs): each module's rank
    from its lora_B, alpha from its `.alpha` tensor, else alpha = rank. Returns (config, alpha defaulted)."""
    ranks = {}
    for name, x in group.items():
        m = peft.FACTOR_KEY.match(name)
        if m and m["lin"] == "lora_B" and m["param"] == "weight" and x.ndim >= 2:
            ranks[m["module"]] = int(x.shape[1])
        elif m and m["emb"] == "lora_embedding_B" and x.ndim == 2:
            ranks[m["module"]] = int(x.shape[1])
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    rank_pattern, alpha_pattern, defaulted = {}, {}, False
    for module, rank in ranks.items():
        # re.escape plus PEFT's "(.*\.)?(key)$" rule: a pattern that matches this module's path and no other.
        if rank != r:
            rank_pattern[re.escape(module)] = rank
        if module in alpha_values:
            alpha_pattern[re.escape(module)] = alpha_values[module]
        else:
            defaulted = True
            alpha_pattern[re.escape(module)] = rank
    bias = any(n.endswith(".lora_B.bias") for n in group)
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "lora_bias": bias}, defaulted


def structure(path, *, base=None, allow_unknown: bool = False) -> Adapter:
    """The adapter of a diffusers LoRA file (every factor None) from its safetensors header and metadata, plus
    any 0-d `.alpha` tensors; no torch.

    Args and Raises: as `load`.
    """
    return header_only(_plan(path, base, allow_unknown, then=lambda adapter, read: adapter))


def load(path, *, base=None, allow_unknown: bool = False, lazy: bool = False) -> Adapter:
    """Read a diffusers LoRA `.safetensors` with its tensors, as numpy arrays (no torch).

    Args:
        path: the file (or a Source of it).
        base: a diffusers model folder (or file) of one component: maps that component's modules to its keys
            and checks shapes; components the base does not hold are left out (info["skipped_components"]).
        allow_unknown: record keys that are not LoRA factors in info["unknown_keys"] instead of failing.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`).
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, key and fix in the message.
    """
    return _plan(path, base, allow_unknown, then=deferred if lazy else materialize)


def _in_base(bk, group: dict) -> bool:
    """Whether the base holds a module of this component (under any leading prefix)."""
    for name in group:
        m = peft.FACTOR_KEY.match(name)
        try:
            bk.resolve_dotted(m["module"] + ".weight", "")
            return True
        except MismatchError:
            continue
    return False


def _plan(path, base, allow_unknown, then):
    src = as_source(path)
    hdr = src.checked_header()
    where = src.path
    configs = configs_of(where, hdr.metadata)
    groups, alpha_metas, unknown = _sort(where, metas_of_header(hdr))
    values = read_scalars(where, hdr, {x.name for d in alpha_metas.values() for x in d.values()})
    for comp, d in alpha_metas.items():
        if comp in configs:
            raise SpecError(f"{where}: component \"{escape(comp) or 'model'}\" has both {METADATA_KEY} and .alpha "
                            "tensors (diffusers refuses both network_alphas and metadata); keep one")
        for module, x in d.items():
            if not finite_number(values[x.name]):
                raise SpecError(f"{where}: \"{escape(x.name)}\" is {values[x.name]}; alpha must be finite")
    extra = sorted(set(configs) - set(groups))
    if extra:
        raise SpecError(f"{where}: {METADATA_KEY} configures component(s) {listing(extra)} that have no LoRA "
                        "factors in the file")
    info: dict = {"dialect": "diffusers"}
    targets: dict[str, Target] = {}
    defaulted, skipped = [], []
    with base_keys(base) as bk:
        for comp, group in sorted(groups.items()):
            if bk is not None and comp and len(groups) > 1 and not _in_base(bk, group):
                skipped.append(comp)
                continue
            cfg = configs.get(comp)
            if cfg is None:
                avals = {m: values[x.name] for m, x in alpha_metas.get(comp, {}).items()}
                cfg, d = _implied_config(where, comp, group, avals)
                if d:
                    defaulted.append(comp or "model")
            a = peft._build(where, cfg, group, bk, True, False, peft._Plan(where))
            unknown += [(comp + "." if comp else "") + n for n in a.info.get("unknown_keys", ())]
            for t in a:
                key = t.key if bk is not None or not comp else comp + "." + t.key
                t = replace(t, key=key, info={**t.info, "diffusers_component": comp} if comp else dict(t.info))
                if key in targets:
                    raise SpecError(f"{where}: two diffusers keys map to base key \"{escape(key)}\"")
                targets[key] = t
    if base is not None and not targets and skipped:
        raise MismatchError(f"{where}: the base {base} holds none of the components {listing(skipped)}; pass "
                            "the model folder of one of them (its diffusion_pytorch_model.safetensors)")
    if skipped:
        info["skipped_components"] = skipped
        info["note"] = f"component(s) {', '.join(skipped)} are not in the base and were left out"
    if defaulted:
        info["alpha_defaulted"] = (f"no {METADATA_KEY} for {', '.join(defaulted)}: alpha = rank (scale 1) where no "
                                   ".alpha tensor is given, as diffusers does")
    check_unknown(where, "diffusers", unknown, allow_unknown, info)
    meta = {k: v for k, v in hdr.metadata.items() if k not in (METADATA_KEY, "format")}
    adapter = Adapter(targets=targets, metadata=meta, info=info)
    return then(adapter, safetensors_reader(where, hdr))


# ---- writer --------------------------------------------------------------------------------------------

def component_of(t: Target, default: str | None) -> tuple[str, str]:
    """(component, key inside it) of a target: from its key's leading component, else the component it was read
    with, else `default` ("" or None: no component, the model-level form)."""
    comp, rest = _split(t.key)
    if comp:
        return comp, rest
    comp = t.info.get("diffusers_component")
    return (comp if isinstance(comp, str) and comp in COMPONENTS else (default or "")), t.key


def plan(adapter: Adapter, component: str | None = None) -> tuple[dict, dict]:
    """(lora_adapter_metadata dict, name -> tensor) expressing `adapter` exactly as a diffusers LoRA file.

    Args:
        component: the component of targets whose key names none (say "unet" or "transformer"); None writes
            them without one, as `ModelMixin.save_lora_adapter` does.
    Raises:
        UnsupportedError: a target PEFT's factors cannot express (peft.plan), or a file would mix targets with
            and without a component.
    """
    if component is not None and component not in COMPONENTS:
        raise UnsupportedError(f"component \"{escape(component)}\" is not a diffusers pipeline component; use one of "
                               f"{', '.join(COMPONENTS)}")
    adapter = adapter.as_numpy()
    groups: dict[str, list[Target]] = {}
    for t in adapter:
        comp, key = component_of(t, component)
        groups.setdefault(comp, []).append(replace(t, key=key))
    if "" in groups and len(groups) > 1:
        raise UnsupportedError(f"targets such as \"{escape(groups[''][0].key)}\" name no pipeline component while "
                               f"others do ({', '.join(sorted(c for c in groups if c))}); pass a component for them")
    meta, tensors = {}, {}
    for comp, ts in sorted(groups.items()):
        cfg, tens = peft.plan(Adapter(targets={t.key: t for t in ts}))
        cfg = {k: v for k, v in cfg.items() if v is not None}
        for field in ("inference_mode", "modules_to_save"):
            cfg.pop(field, None)
        prefix = comp + "." if comp else ""
        meta.update({prefix + k: v for k, v in cfg.items()})
        tensors.update({prefix + n.removeprefix(peft.PREFIX): x for n, x in tens.items()})
    return meta, tensors


def save(adapter: Adapter, path, *, component: str | None = None, overwrite: bool = True) -> int:
    """Write `adapter` as a diffusers LoRA `.safetensors` (with `lora_adapter_metadata`), atomically. Returns
    the bytes written. The caller checks the output against its inputs (fsutil.check_output).

    Args:
        component: see `plan`.
    Raises:
        SpecError: a factor was never loaded or is not floating point.
        UnsupportedError: the adapter cannot be expressed exactly (the message says which target and why).
        NumericError: a factor is not finite.
    """
    numpy_tensors(tensors_of(adapter), path)
    adapter = adapter.as_numpy()
    _check_finite(adapter, tensors_of(adapter), str(path))
    lora_meta, tensors = plan(adapter, component)
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(("loratool.", "peft."))}
    meta["format"] = "pt"
    # As diffusers' write_lora_layers writes it (json.dumps, indent=2, sort_keys=True).
    meta[METADATA_KEY] = json.dumps(lora_meta, indent=2, sort_keys=True, allow_nan=False)
    return write_file(path, tensors, meta, overwrite=overwrite)


def _detect(src: Source) -> int:
    if not (src.path.suffix == ".safetensors" and src.path.is_file()):
        return 0
    hdr = src.header()
    factors = [n for n in hdr.tensors if _canonical(_split(n)[1]) is not None]
    if not factors or any(n.startswith(peft.PREFIX) for n in factors):
        return 0
    # Above kohya (50) and PEFT's bare file (40): a PEFT file names base_model.model., a kohya file no component.
    if METADATA_KEY in hdr.metadata or all(_split(n)[0] for n in factors):
        return 60
    return 0


DIALECT = Dialect(
    name="diffusers", description="a diffusers LoRA .safetensors file (unet./transformer./text_encoder. + lora_A/lora_B)",
    detect=_detect, structure=structure, load=load, options=frozenset({"base", "allow_unknown"}),
    reads=(".safetensors",), save=save, writes="file", suffix=".safetensors",
    save_options=frozenset({"component", "overwrite"}))

__all__ = ["load", "save", "structure", "plan", "configs_of", "component_of", "DIALECT", "METADATA_KEY"]
