"""PEFT LoRA directories: `adapter_config.json` + `adapter_model.safetensors` (or `adapter_model.bin`).

Key rule (read from peft/utils/save_and_load.py, get_peft_model_state_dict): PEFT names each tensor
`base_model.model.<module>.<factor>` with the adapter name ("default") removed, where <module> is the
module's path inside the model given to `get_peft_model` (for LlamaForCausalLM, `model.layers.0.self_attn.q_proj`).
The loratool target key is the base model's state-dict key `<module>.weight`. A model wrapped differently
(AutoModel vs AutoModelForCausalLM, a checkpoint saved with or without a `model.` prefix) shifts that
path by a leading prefix; with a base (`base=`), a key that is not in the base is matched to the one base key
that differs from it only by a leading prefix (BaseKeys.resolve_dotted), and an ambiguous match is an error.

What changes ΔW, and how each is read (peft/tuners/lora/layer.py, model.py):
  scale     lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; per-module r and alpha from
            rank_pattern / alpha_pattern, matched with get_pattern_key: the first pattern key k (in the
            config's order) for which re.match(rf"(.*\\.)?({k})$", module) succeeds.
  linear    lora_A.weight (r, in), lora_B.weight (out, r): ΔW = s B A.
  Conv1D    the same factors, ΔW transposed (fan_in_fan_out; PEFT forces it on for transformers Conv1D and
            off for nn.Linear whatever the config says, so with a base the stored shape decides).
  embedding lora_embedding_A (r, num_embeddings), lora_embedding_B (dim, r): ΔW = s (B A)^T.
  conv      lora_A.weight (r, in, *k), lora_B.weight (out, r, 1, ...): ΔW = s (B A.reshape(r, -1)).reshape(W).
  lora_bias lora_B.bias (out,): the layer's bias gains s * bias, read as a "full" target on `<module>.bias`
            with delta_scale = s, which is exact.
  whole tensors (modules_to_save, saved embedding layers `...base_layer.weight`): they replace the base
            tensor, so with a base they become "full" targets holding saved - base; without one, `load`
            refuses them and `structure` lists them under their own names.
  DoRA      (use_dora, lora_magnitude_vector m): PEFT merges W' = (m / ||V||) * V with V = W + s B A and no eps
            (peft/tuners/lora/dora.py get_weight_norm, variants.py merge_safe): the norm of each row of the
            matrix view M, i.e. per output row of a Linear (over the input dimension), per output channel of a
            conv (over in and the kernel), per embedding dimension of an Embedding (over the vocabulary). Each
            DoRA module is a "dora" target (the pair plus `magnitude`, dora_axis "out", dora_eps 0), read from
            the adapter alone; the merge applies the norm to the base's rows (ops/kinds.py dora_apply). PEFT
            refuses lora_bias with DoRA, and so does loratool.

`structure` reads adapter_config.json and the safetensors header only; `load` reads the tensors as numpy
arrays. Each module's factors are planned once (Lazy: which tensor, which reshape), so both agree by
construction.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapter import EXPERT_LAYOUTS, Adapter, Target, alpha_for_scale, is_per_expert, scale_of
from ..container import escape, read_json_file, write_file
from ..errors import FileError, MismatchError, NumericError, SpecError, UnsupportedError
from ._common import (BaseKeys, Dialect, Lazy, Meta, Source, as_source, attempt, base_keys, check_unknown,
                      deferred, finite_number, fits, header_only, lazy_whole_target, listing,
                      materialize, metas_of_header, metas_of_state_dict, positive_int, read_torch, ref, refusal,
                      require_dir_or_file, safetensors_reader, settle, torch_reader)
from . import peft_params
from .base import TORCH_SUFFIXES
from .native import _check_finite, _num, numpy_tensors, tensors_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

FACTOR_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<lin>lora_A|lora_B)\.(?P<param>weight|bias)|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"|(?P<dora>lora_magnitude_vector)(?:\.weight)?)$", re.S)

# Non-LoRA PEFT types, and why none of them is a ΔW loratool can hold.
NON_LORA = {
    "PREFIX_TUNING": "prefix tuning adds learned key/value prefixes to attention, not a change to any weight",
    "PROMPT_TUNING": "prompt tuning adds virtual input tokens, not a change to any weight",
    "MULTITASK_PROMPT_TUNING": "prompt tuning adds virtual input tokens, not a change to any weight",
    "P_TUNING": "p-tuning adds virtual input tokens from a prompt encoder, not a change to any weight",
    "ADAPTION_PROMPT": "adaption prompts add gated prompt tokens to attention, not a change to any weight",
    "IA3": "IA3 rescales activations element-wise; it is not a low-rank B @ A delta",
    "ADALORA": "AdaLoRA stores an SVD triplet (lora_A, lora_E, lora_B) with its own masking, not LoRA's B @ A",
    "LOHA": "LoHa is a Hadamard product of two low-rank pairs, not one B @ A",
    "LOKR": "LoKr is a Kronecker product, not B @ A",
    "OFT": "OFT multiplies the weight by a learned orthogonal matrix; it is not additive",
    "BOFT": "BOFT multiplies the weight by a learned orthogonal matrix; it is not additive",
    "VERA": "VeRA uses frozen shared random matrices scaled by learned vectors, not stored A and B",
    "POLY": "Poly routes between several LoRA modules per input",
    "LN_TUNING": "LN tuning replaces layer-norm parameters; it has no low-rank factors",
    "FOURIERFT": "FourierFT stores spectral coefficients, not low-rank factors",
    "BONE": "Bone is a block-affine method, not B @ A", "HRA": "HRA is a Householder reflection, not additive",
    "XLORA": "X-LoRA mixes several LoRA adapters per token with a learned gate",
}

# Config fields that must be off: each changes what the saved factors mean.
MUST_BE_OFF = {
    "use_qalora": "QA-LoRA pools the input in groups before lora_A, so its ΔW is not B @ A",
    "layer_replication": "layer_replication duplicates base layers, so targets are not the base's tensors",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot be merged into W",
    "use_bdlora": "block-diagonal LoRA shares factors across blocks in a layout loratool does not read yet",
    "arrow_config": "Arrow routes between several LoRA experts per token",
    "kasa_config": "KaSA adds singular-value factors between A and B",
    "velora_config": "VeLoRA changes the forward pass",
    "monteclora_config": "MonteCLoRA samples its factors",
    "trainable_token_indices": "trainable tokens store replaced embedding rows, which loratool does not read yet",
}
# Config fields loratool reads, or that never change ΔW of a saved adapter.
KNOWN_FIELDS = {
    "peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
    "bias", "modules_to_save", "target_modules", "exclude_modules", "lora_dropout", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "target_parameters",  # read by io/peft_params.py
} | set(MUST_BE_OFF)
# init_lora_weights values whose saved factors are relative to a modified (residual) base until converted.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "eva")


def get_pattern_key(pattern_keys, module: str) -> str | None:
    """PEFT's pattern rule (peft/utils/other.py get_pattern_key): the first key k, in order, for which
    re.match(rf"(.*\\.)?({k})$", module) succeeds; None when none does."""
    for k in pattern_keys:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


def _paths(path, partial: bool = False) -> tuple[Path | None, Path]:
    """(adapter_config.json, weights file); with `partial`, a weights file without its config gives None."""
    p = require_dir_or_file(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / CONFIG_NAME
    if not cfg.exists():  # a pipe or a folder of that name is refused by the reader, saying what it is
        if partial and p.is_file():
            return None, p
        raise refusal(SpecError, "P001", f"{p}: no {CONFIG_NAME} in {folder}; PEFT keeps r and lora_alpha there, and "
                      "loratool never guesses them")
    if not p.is_dir():  # the weights file itself (a pipe given as one is refused when it is read)
        return cfg, p
    for name in WEIGHTS_NAMES:
        if (p / name).exists():
            return cfg, p / name
    raise FileError(f"{p}: has {CONFIG_NAME} but neither {' nor '.join(WEIGHTS_NAMES)}")


def read_config(cfg_path: Path) -> dict:
    """The PEFT config as a dict, checked for everything that changes ΔW.

    Raises:
        SpecError: malformed JSON, `r` missing, not an integer or <= 0, alpha missing or not finite.
        UnsupportedError: not a LoRA adapter, or a LoRA variant loratool cannot hold exactly.
    """
    return check_config(read_json_file(cfg_path, "PEFT adapter_config.json"), cfg_path)


def check_config(cfg, cfg_path) -> dict:
    """A PEFT LoraConfig dict (from adapter_config.json, or a diffusers file's lora_adapter_metadata) checked for
    everything that changes ΔW; `cfg_path` names where it came from in messages.

    Raises:
        SpecError, UnsupportedError: as `read_config`.
    """
    if not isinstance(cfg, dict):
        raise refusal(SpecError, "P001", f"{cfg_path}: top level is not a JSON object")
    ptype = cfg.get("peft_type")
    if not isinstance(ptype, str):
        raise refusal(SpecError, "P002", f"{cfg_path}: \"peft_type\" is missing or not a string; a PEFT LoRA config "
                      "has \"peft_type\": \"LORA\"")
    if ptype.upper() != "LORA":
        why = NON_LORA.get(ptype.upper(), "loratool reads only LoRA (B @ A) adapters")
        raise refusal(UnsupportedError, "P002", f"{cfg_path}: is a PEFT {escape(ptype)} adapter, not LoRA: {why}; it "
                      "cannot be merged into W as a low-rank delta")
    refused = []  # every field is checked; the ones that fail are raised together

    def bad(cls, rule, message):
        refused.append(refusal(cls, rule, f"{cfg_path}: {message}"))

    if "r" not in cfg:
        bad(SpecError, "P003", "\"r\" is missing (PEFT would silently use 8); add the rank the adapter was trained "
                               "with")
    elif not positive_int(cfg["r"]):
        bad(SpecError, "P003", f"\"r\" is {json.dumps(cfg['r'])}; it must be a positive integer")
    if "lora_alpha" not in cfg:
        bad(SpecError, "P004", "\"lora_alpha\" is missing (PEFT would silently use 8); add the alpha the adapter was "
                               "trained with")
    elif not finite_number(cfg["lora_alpha"]):
        bad(SpecError, "P004", f"\"lora_alpha\" is {json.dumps(cfg['lora_alpha'])}; it must be a finite number")
    for name, check, what in (("rank_pattern", positive_int, "a positive integer"),
                              ("alpha_pattern", finite_number, "a finite number")):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict):
            bad(SpecError, "P006", f"\"{name}\" is not an object of pattern -> value")
            continue
        for k, v in pat.items():
            if not check(v):
                bad(SpecError, "P006", f"{name}[\"{escape(k)}\"] is {json.dumps(v)}; it must be {what}")
            try:
                re.compile(k)
            except re.error as e:
                bad(SpecError, "P006", f"{name} key \"{escape(k)}\" is not a valid regular expression ({e})")
    for name in ("use_rslora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(cfg.get(name, False), bool):
            bad(SpecError, "P008", f"\"{name}\" is {json.dumps(cfg[name])}; it must be true or false")
    for name, why in MUST_BE_OFF.items():
        if cfg.get(name) not in (None, False, [], {}):
            bad(UnsupportedError, "P002", f"\"{name}\" is set: {why}")
    settle(cfg_path, refused, None, what="config fields")
    return cfg


def _tensors(src: Source, weights: Path):
    """(name -> Meta, read(names) -> name -> numpy array) of the weights file: the safetensors header alone,
    or a torch file loaded with weights_only=True."""
    if weights.suffix == ".safetensors":
        hdr = src.checked_header(weights)
        return metas_of_header(hdr), safetensors_reader(weights, hdr)
    sd = read_torch(weights)
    return metas_of_state_dict(sd), torch_reader(sd)


def structure(path, *, base=None, allow_unknown: bool = False, allow_partial: bool = False,
              partial: bool = False, problems: list | None = None) -> Adapter:
    """The adapter of a PEFT folder (every factor None) from adapter_config.json and the safetensors header
    alone: no tensor data read, no torch imported (adapter_model.bin is a torch file: it is loaded).

    What only the tensors or the base can decide is described, never refused: without a base a whole saved
    tensor is a full target under its own name; a
    saved whole tensor is listed even when it equals the base's (`load` drops it then), and one on a layer
    that LoRA factors also adapt (PEFT saves the base layer of an adapted embedding) is named in
    info["saved_beside_lora"] (`load` requires it to equal the base's).

    Args:
        partial: describe a weights file given without its adapter_config.json (a lone
            adapter_model.safetensors, a diffusers LoRA file): ranks from the factor shapes, every block's alpha
            NaN, info["alpha_unknown"] naming what is missing; DoRA and lora_bias are read as their tensors say.
        Others: as `load`.
    Raises:
        As `load`, less the refusals that need a base or the tensors.
    """
    plan = _plan(path, base, allow_unknown, allow_partial, describe=True, then=lambda plan, read: plan,
                 partial=partial, problems=problems)
    adapter = header_only(plan.adapter)
    info = dict(adapter.info)
    if plan.shadowed:
        info["saved_beside_lora"] = sorted(n for n, _ in plan.shadowed.values())
    unknown = sum(1 for t in adapter if t.kind == "full" and "pass --base" in t.info.get("peft", ""))
    if unknown:
        info["needs_base"] = (f"{unknown} saved whole tensor(s) are described by shape only: their delta depends on "
                              "the base; pass --base")
    return replace(adapter, info=info)


def load(path, *, base=None, allow_unknown: bool = False, allow_partial: bool = False,
         problems: list | None = None, lazy: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter (folder, or its weights file beside adapter_config.json) with its tensors, as
    numpy arrays (adapter_model.bin is loaded with torch weights_only=True and converted).

    Args:
        path: the PEFT folder, or adapter_model.safetensors/.bin inside it (or a Source of either).
        base: optional base model (path or io.base.BaseModel): resolves target keys, checks shapes,
            decides Conv1D vs nn.Linear by the stored shape, and turns whole saved tensors into deltas.
        allow_unknown: record keys that are not LoRA tensors in info["unknown_keys"] instead of failing.
        allow_partial: with a base, skip the modules (and saved whole tensors) that map to no base key or do
            not fit it, and accept target_modules that match no module of the base, listing each in
            info["skipped"], instead of failing.
        problems: a list to collect the refusals of single modules in (they are left out, the rest is read);
            without it they are raised together, every module named.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`); saved whole
            tensors are still compared with the base now, one at a time. A saved whole tensor reads the base
            when it is loaded, so with a base given as a path (opened and closed here) the
            adapter is read whole instead; pass an open io.base.BaseModel that outlives the adapter.
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, key and fix in the message.
    """
    from .base import is_reader

    lazy = lazy and (base is None or is_reader(base))
    return _plan(path, base, allow_unknown, allow_partial, describe=False,
                 then=(lambda plan, read: _read(plan, read, lazy=True)) if lazy else _read, problems=problems)


@dataclass
class _Plan:
    """A PEFT adapter planned from its config and header: targets with Lazy factors; target key -> name of
    each saved whole tensor; and key -> (name, Lazy delta) of whole tensors on layers LoRA also adapts."""

    where: Path
    adapter: Adapter | None = None
    saved: dict = field(default_factory=dict)
    shadowed: dict = field(default_factory=dict)


def _plan(path, base, allow_unknown, allow_partial, describe, then, partial: bool = False, problems=None):
    """then(_Plan, read) with the base open (saved whole tensors read it when built); per-module
    refusals go to `problems` when given (settle)."""
    src = as_source(path)
    cfg_path, weights = _paths(src.path, partial)
    cfg = read_config(cfg_path) if cfg_path is not None else None
    metas, read = _tensors(src, weights)
    if cfg is None:
        cfg = _config_of_keys(metas)
    with base_keys(base) as bk:
        skipped: list[str] = []
        if bk is not None:
            refused = []
            attempt(refused, fits, lambda: _check_targets_exist(cfg_path, cfg, bk), allow_partial, skipped)
            settle(cfg_path, refused, problems)
        plan = _Plan(weights)
        plan.adapter = _build(weights, cfg, metas, bk, allow_unknown, describe, plan, allow_partial, skipped,
                              problems)
        return then(plan, read)


def _config_of_keys(metas: dict) -> dict:
    """What a missing adapter_config.json would have said, as far as the tensors tell: r and lora_alpha unknown
    (None: ranks come from the factors), DoRA and lora_bias on when their tensors are there."""
    names = list(metas)
    return {"peft_type": "LORA", "r": None, "lora_alpha": None,
            "use_dora": any(n.endswith(("lora_magnitude_vector", "lora_magnitude_vector.weight")) for n in names),
            "lora_bias": any(n.endswith(".lora_B.bias") for n in names)}


def _check_targets_exist(cfg_path, cfg: dict, bk: BaseKeys) -> None:
    """PEFT's rule (tuners_utils.check_target_module_exists, inject_adapter): `target_modules` must name at least
    one module of the base, or PEFT refuses to load the adapter ("Target modules ... not found in the base
    model"); merging such an adapter by its tensors' names alone would apply what PEFT never would.

    A list entry matches a module whose dotted path is it or ends with "." + it; a string is a regular
    expression the whole path must match. Module paths are the base's weight keys without ".weight", under
    any leading prefix (a model saved with or without its `model.` wrapper).

    Raises:
        MismatchError: target_modules is set and matches no module of the base.
    """
    targets = cfg.get("target_modules")
    if not targets:
        return
    modules = {k[: -len(".weight")] for k in bk.keys if k.endswith(".weight")}
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise refusal(SpecError, "P005", f"{cfg_path}: \"target_modules\" is not a regular expression "
                          f"({escape(str(e))})") \
                from None
        found = any(pattern.fullmatch(m) or pattern.fullmatch(m.partition(".")[2]) for m in modules)
    else:
        names = {str(t) for t in targets}
        found = any(m in names or any(m.endswith("." + t) for t in names) for m in modules)
    if not found:
        raise refusal(MismatchError, "B001", f"{cfg_path}: target_modules {json.dumps(targets)} match no module of "
                      f"the base {bk.base.path} (PEFT refuses this adapter too: \"Target modules ... not found in the "
                      "base model\"); use the adapter's own base")


def _read(plan: _Plan, read, lazy: bool = False) -> Adapter:
    """The planned adapter with its tensors (`lazy`: with each target's read on demand). A saved whole tensor
    equal to the base's is dropped (ΔW is zero) and named in info["unchanged_keys"]; one on a layer LoRA factors
    adapt must equal the base's. Both are decided here, reading one saved tensor at a time when `lazy`."""
    adapter = deferred(plan.adapter, read) if lazy else materialize(plan.adapter, read)
    unchanged = []
    for key, (name, delta) in sorted(plan.shadowed.items()):
        if delta.make(read({name})).any():
            raise refusal(SpecError, "P014", f"{plan.where}: \"{escape(name)}\" replaces \"{escape(key)}\", which "
                          "LoRA factors also change; PEFT applies one or the other, so refusing to guess", key)
        unchanged.append(name)
    gone = {k for k in plan.saved if not adapter.targets[k].loaded().delta.any()}
    unchanged += [plan.saved[k] for k in gone]
    if not unchanged:
        return adapter
    info = {**adapter.info, "unchanged_keys": sorted(unchanged)}
    return replace(adapter.replace_targets(t for t in adapter if t.key not in gone), info=info)


def _build(where: Path, cfg: dict, metas: dict, bk: BaseKeys | None, allow_unknown: bool, describe: bool,
           plan: _Plan, allow_partial: bool = False, skipped: list | None = None,
           problems: list | None = None) -> Adapter:
    """The adapter with Lazy factors, from the config and the tensors' names, dtypes and shapes (saved whole
    tensors recorded in `plan`)."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rule = "rslora" if cfg.get("use_rslora") else "standard"
    modules: dict[str, dict] = {}
    whole, unknown = [], []
    for name, x in metas.items():
        mod_path = name.removeprefix(PREFIX)
        m = FACTOR_KEY.match(mod_path)
        if m is None:
            if "lora_" in mod_path:
                unknown.append(name)  # a LoRA-looking key in a shape we do not know: never guess
            else:
                whole.append(name)
            continue
        if m["dora"]:
            part = "magnitude"
        else:
            part = m["lin"] + "." + m["param"] if m["lin"] else m["emb"]
        modules.setdefault(m["module"], {})[part] = x

    targets: dict[str, Target] = {}
    info: dict = {"dialect": "peft", "key_rule": "target = base key of <module>.weight, <module> being the PEFT "
                  "key without \"base_model.model.\" and the factor suffix"}
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        info["note"] = (f"init_lora_weights is \"{init}\": unless the adapter was converted when saved, its delta "
                        "applies to PEFT's residual base, not the original model")
    dora = bool(cfg.get("use_dora"))
    if dora and cfg.get("lora_bias"):
        raise refusal(UnsupportedError, "P002", f"{where}: sets both use_dora and lora_bias, which PEFT refuses "
                      "(\"lora_bias=True is not supported for DoRA\"); the adapter was not made by PEFT")
    refused = []  # modules refused one by one: every one is reported (settle)
    for module, parts in sorted(modules.items()):
        mag = parts.pop("magnitude", None)
        if mag is not None and not dora:
            unknown.append(mag.name)  # PEFT ignores a magnitude vector when use_dora is false: say so, never apply it
        if not parts:
            continue
        if cfg.get("target_parameters") and peft_params.is_parameter_module(cfg, module):
            got = attempt(refused, fits, lambda module=module, parts=parts: _parameter(
                where, module, parts, cfg, bk, rule), allow_partial, skipped)
            if got is not None:
                targets[got.key] = got
            continue
        r_key, a_key = get_pattern_key(rank_pattern, module), get_pattern_key(alpha_pattern, module)
        rank = rank_pattern[r_key] if r_key is not None else cfg["r"]  # None without a config: the factors' rank
        alpha = alpha_pattern[a_key] if a_key is not None else cfg["lora_alpha"]
        alpha = math.nan if alpha is None else float(alpha)  # unknown without a config: never a made-up number
        got = attempt(refused, fits, lambda module=module, parts=parts, mag=mag, rank=rank, alpha=alpha: _module(
            where, module, parts, mag, rank, alpha, rule, cfg, bk, unknown, dora, targets), allow_partial, skipped)
        if got is not None:
            for t in got:
                targets[t.key] = t

    for name in whole:
        t = attempt(refused, fits, lambda name=name: _whole_tensor(where, metas[name], bk, describe), allow_partial,
                    skipped)
        if t is None:
            continue
        if t.key in targets:  # PEFT saves the base layer of an adapted embedding: when read, it must equal the base's
            plan.shadowed[t.key] = (name, t.delta)
            continue
        plan.saved[t.key] = name
        targets[t.key] = t
    settle(where, refused, problems)
    if skipped:
        info["skipped"] = list(skipped)
    check_unknown(where, "PEFT", unknown, allow_unknown, info)
    if cfg["r"] is None:
        info["alpha_unknown"] = (f"no {CONFIG_NAME} beside the weights: ranks come from the factor shapes; "
                                 "lora_alpha, use_rslora and fan_in_fan_out are unknown; inspect the PEFT folder "
                                 "with its config")
        return Adapter(targets=targets, metadata={}, info=info)
    meta = {"peft.r": str(cfg["r"]), "peft.lora_alpha": str(cfg["lora_alpha"])}
    for field in ("base_model_name_or_path", "task_type"):  # kept, so that a conversion back to PEFT loads
        if cfg.get(field):
            meta[f"peft.{field}"] = str(cfg[field])
    return Adapter(targets=targets, metadata=meta, info=info)


def _parameter(where, module, parts, cfg, bk, rule) -> Target:
    """The target of one ParamWrapper (`target_parameters`, io/peft_params.py)."""
    if set(parts) != {"lora_A.weight", "lora_B.weight"}:
        raise refusal(SpecError, "P011", f"{where}: module \"{escape(module)}\" targets parameters and has "
                      f"{sorted(parts)}; a ParamWrapper holds lora_A.weight and lora_B.weight only", module)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def rank_of(key):
        k = get_pattern_key(rank_pattern, key)
        return rank_pattern[k] if k is not None else cfg["r"]

    def alpha_of(key):
        k = get_pattern_key(alpha_pattern, key)
        return float(alpha_pattern[k] if k is not None else cfg["lora_alpha"])

    return peft_params.target(where, module, parts["lora_A.weight"], parts["lora_B.weight"], cfg, rank_of, alpha_of,
                              rule, bk)


def _module(where, module, parts, mag, rank, alpha, rule, cfg, bk, unknown, dora, targets) -> list[Target]:
    """The targets of one PEFT module: its lora (or DoRA) target and its lora bias, if any."""
    t, bias = _target(where, module, parts, rank, alpha, rule, cfg, bk, unknown)
    if dora:
        if mag is None:
            raise refusal(SpecError, "P014", f"{where}: module \"{escape(module)}\" has no lora_magnitude_vector but "
                          "the config sets use_dora", module)
        t = _dora_target(where, module, t, mag)
    if t.key in targets:
        raise refusal(SpecError, "F002", f"{where}: modules \"{escape(module)}\" and another both map to base key "
                      f"\"{escape(t.key)}\"", module)
    return [t] if bias is None else [t, bias]


def _target(where, module, parts, rank, alpha, rule, cfg, bk, unknown):
    """One lora Target (and its lora_bias full target, or None) from a module's PEFT tensors (Meta)."""
    shown = escape(module)
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        need, layout = ("lora_embedding_A", "lora_embedding_B"), "embedding"
    else:
        need, layout = ("lora_A.weight", "lora_B.weight"), None
    missing = [n for n in need if n not in parts]
    if missing:
        raise refusal(SpecError, "P011", f"{where}: module \"{shown}\" has no {missing[0]}; every LoRA module needs "
                      "both factors", module)
    A, B = parts[need[0]], parts[need[1]]
    extra = [parts[n].name for n in parts if n not in need and n != "lora_B.bias"]
    if extra:
        raise refusal(SpecError, "P011", f"{where}: module \"{shown}\" mixes embedding and linear factors "
                      f"({listing(extra)})", module)
    if not (A.is_float and B.is_float):
        raise refusal(SpecError, "P012", f"{where}: module \"{shown}\": factors are {A.dtype}/{B.dtype}; LoRA factors "
                      "are floating point", module)
    if A.ndim < 2 or B.ndim != A.ndim or any(d != 1 for d in B.shape[2:]):
        raise refusal(SpecError, "P012", f"{where}: module \"{shown}\": lora_A {list(A.shape)} and lora_B "
                      f"{list(B.shape)} are not a LoRA pair (2-D, or conv with a 1x1 lora_B)", module)
    r = int(A.shape[0])
    if B.shape[1] != r:
        if A.ndim > 2:
            raise refusal(UnsupportedError, "P012", f"{where}: module \"{shown}\": lora_B {list(B.shape)} has "
                          f"{B.shape[1]} input channels for rank {r}: a grouped convolution, which loratool does not "
                          "read yet", module)
        raise refusal(SpecError, "P012", f"{where}: module \"{shown}\": lora_A rank {r} != lora_B rank "
                      f"{B.shape[1]}", module)
    if rank is not None and r != rank:
        raise refusal(SpecError, "P013", f"{where}: module \"{shown}\": factors have rank {r} but the config gives r "
                      f"= {rank} (after rank_pattern); fix adapter_config.json", module)
    out = int(B.shape[0])
    if layout == "embedding":
        shape = (int(A.shape[1]), out)  # (num_embeddings, dim)
        A2, B2 = ref(A.name), ref(B.name)  # M = W^T (dim, num_embeddings): A (r, num_embeddings) are its columns
    elif A.ndim > 2:
        layout, shape = "conv", (out, *(int(d) for d in A.shape[1:]))
        A2, B2 = ref(A.name, lambda a: a.reshape(r, -1)), ref(B.name, lambda b: b.reshape(out, r))
    else:
        fio = bool(cfg.get("fan_in_fan_out"))
        inp = int(A.shape[1])
        layout, shape = ("fan_in_fan_out", (inp, out)) if fio else ("linear", (out, inp))
        A2, B2 = ref(A.name), ref(B.name)
    key = module + ".weight"
    tinfo = {}
    if bk is not None:
        key = bk.resolve_dotted(key, f"{where}: module \"{shown}\"", module)
        have = bk.shape(key)
        if layout in ("linear", "fan_in_fan_out") and have != shape:
            flipped = ("linear" if layout == "fan_in_fan_out" else "fan_in_fan_out", shape[::-1])
            if have == flipped[1]:
                # PEFT sets fan_in_fan_out per module from its type (Conv1D on, nn.Linear off), not from the config.
                layout, shape = flipped
                tinfo["layout_from"] = "base shape (PEFT decides fan_in_fan_out per module type)"
        if have != shape:
            raise refusal(MismatchError, "B002", f"{where}: module \"{shown}\": LoRA factors imply {layout} weight "
                          f"{list(shape)} but base \"{escape(key)}\" is {list(have)}", module)
    target = lazy_whole_target(key, layout, shape, r, A2, B2, alpha, rule, info=tinfo)
    bias = None
    if "lora_B.bias" in parts:
        bvec = parts["lora_B.bias"]
        if not cfg.get("lora_bias"):
            unknown.append(bvec.name)  # PEFT itself ignores it when lora_bias is false: say so, never apply it
        else:
            if tuple(bvec.shape) != (out,):
                raise refusal(SpecError, "P014", f"{where}: \"{escape(bvec.name)}\" has shape {list(bvec.shape)}, "
                              f"expected [{out}]", module)
            bkey = key[: -len(".weight")] + ".bias" if key.endswith(".weight") else module + ".bias"
            have_b = bk.shape(bkey) if bk is not None else (out,)
            if have_b != (out,):
                raise refusal(MismatchError, "B002", f"{where}: module \"{shown}\" has a lora bias but base "
                              f"\"{escape(bkey)}\" is {'missing' if have_b is None else list(have_b)}; PEFT cannot "
                              "merge it either", module)
            bias = Target(key=bkey, kind="full", layout="full", shape=(out,), delta=ref(bvec.name),
                          delta_scale=scale_of(alpha, r, rule), info={"peft": "lora_B.bias"})
    return target, bias


def _dora_target(where, module, t: Target, mag: Meta) -> Target:
    """A DoRA module as a "dora" target: the lora pair of `t` and the magnitude m (Lazy), one per row of the
    matrix view M (PEFT's weight norm, module docstring), no eps."""
    out = t.matrix_shape[0]
    if mag.numel != out or not mag.is_float:
        raise refusal(SpecError, "P014", f"{where}: module \"{escape(module)}\": lora_magnitude_vector has shape "
                      f"{list(mag.shape)} ({mag.dtype}), expected {out} floating-point values (one per row of the "
                      f"{t.layout} weight's (out, in) view, as PEFT's get_weight_norm)", module)
    return replace(t, kind="dora", magnitude=ref(mag.name, lambda m: m.reshape(-1)), dora_axis="out", dora_eps=0.0,
                   info={**t.info, "peft": "DoRA", "factor_shapes": {"magnitude": list(mag.shape)}})


def _whole_tensor(where, x: Meta, bk, describe: bool) -> Target:
    """A saved whole tensor (modules_to_save, saved embedding layer) as a full target holding saved - base
    (Lazy); without a base, refused, or (`describe`) listed under its own name with its delta unknown."""
    name = x.name
    key = name.removeprefix(PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.", ".")
    if bk is None:
        if not describe:
            raise UnsupportedError(f"{where}: \"{escape(name)}\" is a whole saved tensor (modules_to_save or a saved "
                                   "embedding layer) that replaces the base's; pass --base so loratool can store its "
                                   "difference from the base")
        return Target(key=key, kind="full", layout="full", shape=tuple(x.shape), delta=None, delta_scale=1.0,
                      info={"peft": "whole saved tensor that replaces the base's; pass --base to know its delta",
                            "saved_as": name, "saved_dtype": x.dtype})
    key = bk.resolve_dotted(key, f"{where}: \"{escape(name)}\"")
    if bk.shape(key) != tuple(x.shape):
        raise refusal(MismatchError, "B002", f"{where}: \"{escape(name)}\" is {list(x.shape)} but base "
                      f"\"{escape(key)}\" is {list(bk.shape(key))}", name)
    if not x.is_float:
        raise refusal(UnsupportedError, "P014", f"{where}: \"{escape(name)}\" is {x.dtype}; only floating-point "
                      "tensors can be stored as deltas", name)

    def make(arrays):
        from ..dtypes import as_f32

        return as_f32(arrays[name]) - as_f32(bk.read(key))  # exact for inputs of <= 24-bit mantissa

    return Target(key=key, kind="full", layout="full", shape=tuple(x.shape), delta=Lazy((name,), make),
                  delta_scale=1.0, info={"peft": "whole tensor, stored as saved - base"})


# ---- writer --------------------------------------------------------------------------------------------

def _module_of(t: Target, suffix: str) -> str:
    if not t.key.endswith(suffix):
        raise UnsupportedError(f"target \"{escape(t.key)}\": PEFT adapts modules, so a LoRA target key must end in "
                               f"\"{suffix}\"")
    return t.key[: -len(suffix)]


def holds(t: Target) -> bool:
    """Whether PEFT holds a lora target as it is: one A/B pair over the whole weight, or for a fused expert
    tensor one pair per expert of one rank and alpha (ParamWrapper); others are folded first (ops/fold.py)."""
    return is_per_expert(t) if t.layout in EXPERT_LAYOUTS else t.is_whole


def _expert_tensors(t: Target, prefix: str, depth: int) -> dict:
    """A fused expert target (adapter.is_per_expert) as one ParamWrapper's factors (io/peft_params.py): lora_A
    (E·r, in), expert e's A the rows [e·r, (e+1)·r); lora_B (out, E·r), expert e's B the columns e, e + E, ...
    The wrapper `depth` levels inside the module's outermost one is named with as many `.base_layer`."""
    import numpy as np

    A = np.concatenate([b.A for b in t.blocks], axis=0)  # E x (r, in) -> (E·r, in)
    B = np.stack([b.B for b in t.blocks], axis=2)  # E x (out, r) -> (out, r, E)
    B = np.ascontiguousarray(B.reshape(B.shape[0], -1))  # (out, r·E): column k·E + e is expert e's column k
    name = prefix + ".base_layer" * depth
    return {name + ".lora_A.weight": A, name + ".lora_B.weight": B}


def plan(adapter: Adapter, base_model_name_or_path: str | None = None,
         task_type: str | None = None) -> tuple[dict, dict]:
    """The adapter_config.json dict and name -> tensor that express `adapter` exactly in PEFT.

    Factors may be numpy arrays or torch tensors; the tensors returned are numpy arrays.

    Raises:
        UnsupportedError: a target PEFT cannot express (row/column blocks, several pairs, a full target that is
            not a lora bias, a lora bias beside an embedding target).
    """
    import numpy as np

    adapter = adapter.as_numpy()
    lora = [t for t in adapter if t.kind in ("lora", "dora")]
    full = {t.key: t for t in adapter if t.kind == "full"}
    if not lora:
        raise UnsupportedError("adapter has no LoRA targets; a PEFT LoRA adapter needs at least one")
    dora = _dora_of(lora, full)
    for t in lora:
        if not holds(t):
            spans = ", ".join(f"rows {b.rows[0]}:{b.rows[1]} cols {b.cols[0]}:{b.cols[1]}" for b in t.blocks)
            raise UnsupportedError(f"target \"{escape(t.key)}\" has {len(t.blocks)} block(s) ({spans}); PEFT holds "
                                   "one A/B pair over the whole weight: fold it first (ops.fold.fold_target, which "
                                   "loratool.save and every command do)")
    rule = _majority(t.blocks[0].scale_rule for t in lora)  # the majority rule is written as-is
    ranks, alphas = {}, {}
    for t in lora:
        b = t.blocks[0]
        ranks[t.key] = b.rank
        # A block under the other rule keeps its scale exactly in value: alpha' = scale * r (or * sqrt(r)).
        alphas[t.key] = b.alpha if b.scale_rule == rule else alpha_for_scale(b.scale, b.rank, rule)
    r, alpha = _majority(ranks.values()), _majority(alphas.values())
    tensors, modules = {}, []
    rank_pattern, alpha_pattern = {}, {}
    used_bias = set()
    params = sorted(t.key for t in lora if t.layout in EXPERT_LAYOUTS)  # PEFT target_parameters
    for t in lora:
        b = t.blocks[0]
        fused = t.layout in EXPERT_LAYOUTS
        module = t.key.rpartition(".")[0] if fused else _module_of(t, ".weight")
        # re.escape makes the pattern match this module (parameter) and no other (PEFT treats keys as regexes);
        # PEFT matches a parameter's patterns on `<module>.<parameter>`.
        name = t.key if fused else module
        if ranks[t.key] != r:
            rank_pattern[re.escape(name)] = ranks[t.key]
        if alphas[t.key] != alpha:
            alpha_pattern[re.escape(name)] = _num(alphas[t.key])
        if fused:  # nested ParamWrappers: the parameter registered first is innermost (io/peft_params.py)
            order = peft_params.parameters_of({"target_parameters": params}, module)
            depth = len(order) - 1 - order.index(t.key.rpartition(".")[2])
            tensors.update(_expert_tensors(t, PREFIX + module, depth))
            continue
        modules.append(module)
        p = PREFIX + module
        A, B = b.A, b.B
        if t.layout == "embedding":
            tensors[p + ".lora_embedding_A"], tensors[p + ".lora_embedding_B"] = A, B
        elif t.layout == "conv":
            k = tuple(t.shape[1:])
            tensors[p + ".lora_A.weight"] = A.reshape(b.rank, *k)  # (r, in, *k)
            tensors[p + ".lora_B.weight"] = B.reshape(B.shape[0], b.rank, *([1] * (len(k) - 1)))  # (out, r, 1, ...)
        else:
            tensors[p + ".lora_A.weight"], tensors[p + ".lora_B.weight"] = A, B
        if dora:
            tensors[p + ".lora_magnitude_vector"] = t.magnitude.reshape(-1)  # (out,), as PEFT saves it
    lora_bias = False
    for key, ft in full.items():
        owner = adapter.targets.get(key[: -len(".bias")] + ".weight") if key.endswith(".bias") else None
        if owner is None or owner.kind not in ("lora", "dora") or owner.layout == "embedding" or tuple(ft.shape) != \
                (owner.matrix_shape[0],):
            raise UnsupportedError(f"target \"{escape(key)}\" is a whole-tensor delta; PEFT can hold one only as the "
                                   "lora_B bias of a LoRA module on the same layer, so the conversion cannot be exact")
        s = owner.blocks[0].scale if owner.blocks[0].scale_rule == rule else \
            scale_of(alphas[owner.key], ranks[owner.key], rule)
        vec = ft.delta if ft.delta_scale == s else \
            (ft.delta.astype(np.float64) * (ft.delta_scale / s)).astype(ft.delta.dtype)
        tensors[PREFIX + _module_of(owner, ".weight") + ".lora_B.bias"] = vec
        used_bias.add(owner.key)
        lora_bias = True
    if lora_bias:
        for t in lora:
            if t.key in used_bias:
                continue
            if t.layout == "embedding" or t.layout in EXPERT_LAYOUTS:
                what = "an embedding" if t.layout == "embedding" else "a fused expert tensor (ParamWrapper)"
                raise UnsupportedError(f"target \"{escape(t.key)}\" is {what} and PEFT's lora_bias is global but "
                                       "not allowed there, so the conversion cannot be exact")
            B = t.blocks[0].B
            tensors[PREFIX + _module_of(t, ".weight") + ".lora_B.bias"] = np.zeros(B.shape[0], dtype=B.dtype)
    cfg = {
        "peft_type": "LORA", "task_type": task_type or adapter.metadata.get("peft.task_type"),
        "base_model_name_or_path": base_model_name_or_path or adapter.metadata.get("peft.base_model_name_or_path"),
        "r": r, "lora_alpha": _num(alpha), "use_rslora": rule == "rslora",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(modules), **({"target_parameters": params} if params else {}),
        "fan_in_fan_out": any(t.layout == "fan_in_fan_out" for t in lora),
        "lora_bias": lora_bias, "bias": "none", "lora_dropout": 0.0, "use_dora": dora, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }
    return cfg, tensors


def _dora_of(lora: list[Target], full: dict) -> bool:
    """Whether the PEFT config sets use_dora: every target is a DoRA that PEFT can hold, or none is.

    Raises:
        UnsupportedError: DoRA beside plain LoRA (use_dora is one switch for every module), a DoRA norm PEFT
            does not compute (per input channel, or with an eps: LyCORIS's), or DoRA beside a lora bias.
    """
    dora = [t for t in lora if t.is_dora]
    if not dora:
        return False
    if len(dora) != len(lora):
        plain = next(t for t in lora if not t.is_dora)
        raise UnsupportedError(f"target \"{escape(plain.key)}\" is plain LoRA beside {len(dora)} DoRA target(s); "
                               "PEFT's use_dora applies to every module, and a DoRA magnitude that reproduces W + ΔW "
                               "depends on the base's row norms, so the conversion cannot be exact; write the DoRA "
                               "and the LoRA targets to two adapters (--targets / --exclude)")
    for t in dora:
        where = f"target \"{escape(t.key)}\""
        if t.kind != "dora":
            raise UnsupportedError(f"{where} is {t.kind} with DoRA; PEFT's DoRA holds one LoRA pair per module")
        if t.dora_axis != "out":
            raise UnsupportedError(f"{where} is DoRA with one norm per input channel (LyCORIS wd_on_out=False); PEFT "
                                   "normalizes each output row of W + ΔW, and the two rescalings differ, so the "
                                   "conversion cannot be exact; keep it in kohya's format, or merge it")
        if t.dora_eps != 0.0:
            raise UnsupportedError(f"{where} is DoRA whose norm adds eps {t.dora_eps:g} (LyCORIS's); PEFT adds none, "
                                   "and m / (‖W + ΔW‖ + eps) equals m' / ‖W + ΔW‖ only for an m' that depends on the "
                                   "base, so the conversion cannot be exact; keep it in kohya's format, or merge it")
    if full:
        raise UnsupportedError(f"target \"{escape(next(iter(full)))}\" is a whole-tensor delta beside DoRA; PEFT "
                               "holds one only as a lora_B bias, which it refuses with DoRA (\"lora_bias=True is "
                               "not supported for DoRA\"), so the conversion cannot be exact")
    return True


def _majority(values):
    """The most frequent value; the smallest of those tied."""
    return sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def save(adapter: Adapter, path, *, overwrite: bool = False, base_model_name_or_path: str | None = None,
         task_type: str | None = None) -> int:
    """Write `adapter` as a PEFT folder (adapter_config.json + adapter_model.safetensors), atomically.

    Returns the bytes written. The caller checks the output against its inputs (fsutil.check_output).

    Raises:
        UnsupportedError: the adapter cannot be expressed in PEFT exactly (the message says which target, why).
        NumericError: a factor is not finite.
    """
    from ..fsutil import atomic_dir

    numpy_tensors(tensors_of(adapter), path)  # every factor loaded and floating point
    adapter = adapter.as_numpy()
    _check_finite(adapter, tensors_of(adapter), str(path))
    cfg, tensors = plan(adapter, base_model_name_or_path, task_type)
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loratool.")}
    meta["format"] = "pt"
    with atomic_dir(path, overwrite=overwrite) as tmp:
        n = write_file(tmp / WEIGHTS_NAMES[0], tensors, meta)
        text = json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    return n + len(text.encode("utf-8"))


def _detect(src: Source) -> int:
    p = src.path
    if p.is_dir():
        return 100 if (p / CONFIG_NAME).exists() else 0
    if p.suffix in TORCH_SUFFIXES:
        return 100 if (p.parent / CONFIG_NAME).exists() else 0  # adapter_model.bin of a PEFT folder
    if p.suffix == ".safetensors":
        names = src.header().tensors
        return 40 if any(".lora_A." in n or ".lora_B." in n or ".lora_embedding_A" in n for n in names) else 0
    return 0


DIALECT = Dialect(
    name="peft", description="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors or .bin)",
    detect=_detect, structure=structure, load=load,
    options=frozenset({"base", "allow_unknown", "allow_partial", "problems"}),
    reads=(".safetensors", ".bin"), save=save, writes="folder", structure_options=frozenset({"partial"}),
    save_options=frozenset({"overwrite", "base_model_name_or_path", "task_type"}), holds=holds,
    kinds=frozenset({"lora", "full", "dora"}))

__all__ = ["load", "save", "structure", "plan", "holds", "read_config", "check_config", "get_pattern_key", "DIALECT"]
