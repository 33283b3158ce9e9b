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
            tensor, so with a base they become "full" targets holding saved - base; without one, refused.
  DoRA      (use_dora, lora_magnitude_vector m): PEFT merges W' = (m / ||V||_row) * V with V = W + s B A, the
            norm of each output row over the input dimension (peft/tuners/lora/dora.py, variants.py
            merge_safe). W' - W is not low-rank, so with a base each DoRA module becomes a "full" target holding
            W' - W computed in float32 (as large as the weight); without a base it is refused.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, Target, alpha_for_scale, scale_of, whole_target
from ..container import _no_constant, escape, write_file
from ..errors import FileError, MismatchError, NumericError, SpecError, UnsupportedError
from ._common import (BaseKeys, base_keys, check_unknown, finite_number, listing, positive_int, read_safetensors,
                      read_torch, require_dir_or_file, torch_factors)
from .native import _check_finite, _num, tensors_of

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
    "target_parameters": "LoRA on nn.Parameter targets (MoE experts) uses per-expert factors loratool does not "
                         "read yet",
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


def _paths(path) -> tuple[Path, Path]:
    p = require_dir_or_file(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise SpecError(f"{p}: no {CONFIG_NAME} in {folder}; PEFT keeps r and lora_alpha there, and loratool "
                        "never guesses them")
    if p.is_file():
        return cfg, p
    for name in WEIGHTS_NAMES:
        if (p / name).is_file():
            return cfg, p / name
    raise FileError(f"{p}: has {CONFIG_NAME} but neither {' nor '.join(WEIGHTS_NAMES)}")


def read_config(cfg_path: Path) -> dict:
    """The PEFT config as a dict, checked for everything that changes ΔW.

    Raises:
        SpecError: malformed JSON, `r` missing, not an integer or <= 0, alpha missing or not finite.
        UnsupportedError: not a LoRA adapter, or a LoRA variant loratool cannot hold exactly.
    """
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise FileError(f"{cfg_path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise SpecError(f"{cfg_path}: not valid JSON ({escape(str(e))})") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg_path}: top level is not a JSON object")
    ptype = cfg.get("peft_type")
    if not isinstance(ptype, str):
        raise SpecError(f"{cfg_path}: \"peft_type\" is missing or not a string; a PEFT LoRA config has "
                        "\"peft_type\": \"LORA\"")
    if ptype.upper() != "LORA":
        why = NON_LORA.get(ptype.upper(), "loratool reads only LoRA (B @ A) adapters")
        raise UnsupportedError(f"{cfg_path}: is a PEFT {escape(ptype)} adapter, not LoRA: {why}; it cannot be "
                               "merged into W as a low-rank delta")
    if "r" not in cfg:
        raise SpecError(f"{cfg_path}: \"r\" is missing (PEFT would silently use 8); add the rank the adapter was "
                        "trained with")
    if not positive_int(cfg["r"]):
        raise SpecError(f"{cfg_path}: \"r\" is {json.dumps(cfg['r'])}; it must be a positive integer")
    if "lora_alpha" not in cfg:
        raise SpecError(f"{cfg_path}: \"lora_alpha\" is missing (PEFT would silently use 8); add the alpha the "
                        "adapter was trained with")
    if not finite_number(cfg["lora_alpha"]):
        raise SpecError(f"{cfg_path}: \"lora_alpha\" is {json.dumps(cfg['lora_alpha'])}; it must be a finite number")
    for name, check, what in (("rank_pattern", positive_int, "a positive integer"),
                              ("alpha_pattern", finite_number, "a finite number")):
        pat = cfg.get(name) or {}
        if not isinstance(pat, dict):
            raise SpecError(f"{cfg_path}: \"{name}\" is not an object of pattern -> value")
        for k, v in pat.items():
            if not check(v):
                raise SpecError(f"{cfg_path}: {name}[\"{escape(k)}\"] is {json.dumps(v)}; it must be {what}")
            try:
                re.compile(k)
            except re.error as e:
                raise SpecError(f"{cfg_path}: {name} key \"{escape(k)}\" is not a valid regular expression ({e})") \
                    from None
    for name in ("use_rslora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(cfg.get(name, False), bool):
            raise SpecError(f"{cfg_path}: \"{name}\" is {json.dumps(cfg[name])}; it must be true or false")
    for name, why in MUST_BE_OFF.items():
        if cfg.get(name) not in (None, False, [], {}):
            raise UnsupportedError(f"{cfg_path}: \"{name}\" is set: {why}")
    return cfg


def load(path, *, base=None, allow_unknown: bool = False, host: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter (folder, or its weights file beside adapter_config.json) with its tensors.

    Args:
        path: the PEFT folder, or adapter_model.safetensors/.bin inside it.
        base: optional base model (path or io.base.BaseModel): resolves target keys, checks shapes,
            decides Conv1D vs nn.Linear by the stored shape, and turns whole saved tensors into deltas.
        allow_unknown: record keys that are not LoRA tensors in info["unknown_keys"] instead of failing.
        host: read a .safetensors file into hostarray.HostTensors (numpy, no torch import); DoRA modules and
            saved whole tensors are still computed with torch.
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, key and fix in the message.
    """
    cfg_path, weights = _paths(path)
    cfg = read_config(cfg_path)
    if weights.suffix == ".safetensors":
        tensors, _meta = read_safetensors(weights, host=host)
    else:
        tensors = read_torch(weights)
    with base_keys(base) as bk:
        return _build(weights, cfg, tensors, bk, allow_unknown)


def _build(where: Path, cfg: dict, tensors: dict, bk: BaseKeys | None, allow_unknown: bool) -> Adapter:
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rule = "rslora" if cfg.get("use_rslora") else "standard"
    modules: dict[str, dict] = {}
    whole, unknown = [], []
    for name, x in tensors.items():
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
        modules.setdefault(m["module"], {})[part] = (name, x)

    targets: dict[str, Target] = {}
    info: dict = {"dialect": "peft", "key_rule": "target = base key of <module>.weight, <module> being the PEFT "
                  "key without \"base_model.model.\" and the factor suffix"}
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        info["note"] = (f"init_lora_weights is \"{init}\": unless the adapter was converted when saved, its delta "
                        "applies to PEFT's residual base, not the original model")
    dora = bool(cfg.get("use_dora"))
    if dora and bk is None:
        raise UnsupportedError(f"{where}: is a DoRA adapter (use_dora); its merged weight depends on the base's row "
                               "norms, so pass --base and loratool stores each module's exact W' - W")
    for module, parts in sorted(modules.items()):
        mag = parts.pop("magnitude", None)
        if mag is not None and not dora:
            unknown.append(mag[0])  # PEFT ignores a magnitude vector when use_dora is false: say so, never apply it
        if not parts:
            continue
        r_key, a_key = get_pattern_key(rank_pattern, module), get_pattern_key(alpha_pattern, module)
        rank = rank_pattern[r_key] if r_key is not None else cfg["r"]
        alpha = float(alpha_pattern[a_key] if a_key is not None else cfg["lora_alpha"])
        t, bias = _target(where, module, parts, rank, alpha, rule, cfg, bk, unknown)
        if dora:
            if mag is None:
                raise SpecError(f"{where}: module \"{escape(module)}\" has no lora_magnitude_vector but the config "
                                "sets use_dora")
            t = _dora_full(where, module, t, mag[1], bk)
        if t.key in targets:
            raise SpecError(f"{where}: modules \"{escape(module)}\" and another both map to base key "
                            f"\"{escape(t.key)}\"")
        targets[t.key] = t
        if bias is not None:
            targets[bias.key] = bias

    for name in whole:
        t = _whole_tensor(where, name, tensors[name], bk, info)
        if t is not None:
            if t.key in targets:
                raise SpecError(f"{where}: \"{escape(name)}\" replaces \"{escape(t.key)}\", which LoRA factors also "
                                "change; PEFT applies one or the other, so refusing to guess")
            targets[t.key] = t
    check_unknown(where, "PEFT", unknown, allow_unknown, info)
    meta = {"peft.r": str(cfg["r"]), "peft.lora_alpha": str(cfg["lora_alpha"])}
    if cfg.get("base_model_name_or_path"):
        meta["peft.base_model_name_or_path"] = str(cfg["base_model_name_or_path"])
    return Adapter(targets=targets, metadata=meta, info=info)


def _target(where, module, parts, rank, alpha, rule, cfg, bk, unknown):
    """One lora Target (and its lora_bias full target, or None) from a module's PEFT tensors."""
    shown = escape(module)
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        need, layout = ("lora_embedding_A", "lora_embedding_B"), "embedding"
    else:
        need, layout = ("lora_A.weight", "lora_B.weight"), None
    missing = [n for n in need if n not in parts]
    if missing:
        raise SpecError(f"{where}: module \"{shown}\" has no {missing[0]}; every LoRA module needs both factors")
    (_, A), (_, B) = parts[need[0]], parts[need[1]]
    extra = [parts[n][0] for n in parts if n not in need and n != "lora_B.bias"]
    if extra:
        raise SpecError(f"{where}: module \"{shown}\" mixes embedding and linear factors ({listing(extra)})")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise SpecError(f"{where}: module \"{shown}\": factors are {A.dtype}/{B.dtype}; LoRA factors are floating point")
    if A.ndim < 2 or B.ndim != A.ndim or any(d != 1 for d in B.shape[2:]):
        raise SpecError(f"{where}: module \"{shown}\": lora_A {list(A.shape)} and lora_B {list(B.shape)} are not a "
                        "LoRA pair (2-D, or conv with a 1x1 lora_B)")
    r = int(A.shape[0])
    if B.shape[1] != r:
        if A.ndim > 2:
            raise UnsupportedError(f"{where}: module \"{shown}\": lora_B {list(B.shape)} has {B.shape[1]} input "
                                   f"channels for rank {r}: a grouped convolution, which loratool does not read yet")
        raise SpecError(f"{where}: module \"{shown}\": lora_A rank {r} != lora_B rank {B.shape[1]}")
    if r != rank:
        raise SpecError(f"{where}: module \"{shown}\": factors have rank {r} but the config gives r = {rank} (after "
                        "rank_pattern); fix adapter_config.json")
    out = int(B.shape[0])
    if layout == "embedding":
        shape = (int(A.shape[1]), out)  # (num_embeddings, dim)
        A2, B2 = A, B  # M = W^T (dim, num_embeddings): A (r, num_embeddings) are its columns
    elif A.ndim > 2:
        layout, shape = "conv", (out, *(int(d) for d in A.shape[1:]))
        A2, B2 = A.reshape(r, -1), B.reshape(out, r)
    else:
        fio = bool(cfg.get("fan_in_fan_out"))
        inp = int(A.shape[1])
        layout, shape = ("fan_in_fan_out", (inp, out)) if fio else ("linear", (out, inp))
        A2, B2 = A, B
    key = module + ".weight"
    tinfo = {}
    if bk is not None:
        key = bk.resolve_dotted(key, f"{where}: module \"{shown}\"")
        have = bk.shape(key)
        if layout in ("linear", "fan_in_fan_out") and have != shape:
            flipped = ("linear" if layout == "fan_in_fan_out" else "fan_in_fan_out", shape[::-1])
            if have == flipped[1]:
                # PEFT sets fan_in_fan_out per module from its type (Conv1D on, nn.Linear off), not from the config.
                layout, shape = flipped
                tinfo["layout_from"] = "base shape (PEFT decides fan_in_fan_out per module type)"
        if have != shape:
            raise MismatchError(f"{where}: module \"{shown}\": LoRA factors imply {layout} weight {list(shape)} but "
                                f"base \"{escape(key)}\" is {list(have)}")
    target = whole_target(key, layout, shape, A2, B2, alpha, rule, info=tinfo)
    bias = None
    if "lora_B.bias" in parts:
        bname, bvec = parts["lora_B.bias"]
        if not cfg.get("lora_bias"):
            unknown.append(bname)  # PEFT itself ignores it when lora_bias is false: say so, never apply it
        else:
            if tuple(bvec.shape) != (out,):
                raise SpecError(f"{where}: \"{escape(bname)}\" has shape {list(bvec.shape)}, expected [{out}]")
            bkey = key[: -len(".weight")] + ".bias" if key.endswith(".weight") else module + ".bias"
            have_b = bk.shape(bkey) if bk is not None else (out,)
            if have_b != (out,):
                raise MismatchError(f"{where}: module \"{shown}\" has a lora bias but base \"{escape(bkey)}\" is "
                                    f"{'missing' if have_b is None else list(have_b)}; PEFT cannot merge it either")
            bias = Target(key=bkey, kind="full", layout="full", shape=(out,), delta=bvec,
                          delta_scale=scale_of(alpha, r, rule), info={"peft": "lora_B.bias"})
    return target, bias


def _dora_full(where, module, t: Target, mag, bk: BaseKeys) -> Target:
    """A DoRA module as the full target W' - W, W' = (m / ||V||_row) * V, V = W + s B A, in float32."""
    import torch

    from ..hostarray import as_torch

    shown = escape(module)
    if t.layout == "embedding":
        raise UnsupportedError(f"{where}: module \"{shown}\" is a DoRA embedding, which loratool does not read yet")
    W = bk.read(t.key)
    if not W.is_floating_point():
        raise UnsupportedError(f"{where}: base \"{escape(t.key)}\" is {W.dtype}; DoRA needs a floating-point weight")
    out, inp = t.matrix_shape
    if mag.numel() != out or not mag.is_floating_point():
        raise SpecError(f"{where}: module \"{shown}\": lora_magnitude_vector has shape {list(mag.shape)}, expected "
                        f"{out} floating-point values (one per output row)")
    W32 = W.to(torch.float32)
    M = W32.T if t.layout == "fan_in_fan_out" else W32.reshape(out, inp)  # the (out, in) matrix view
    b = t.blocks[0]
    V = M + (as_torch(b.B).to(torch.float32) @ as_torch(b.A).to(torch.float32)) * b.scale  # (out, r) @ (r, in) -> (out, in)
    norm = torch.linalg.vector_norm(V, dim=1)  # (out,): PEFT's weight norm, per output row
    D = (as_torch(mag).reshape(out).to(torch.float32) / norm)[:, None] * V - M
    if not bool(torch.isfinite(D).all()):
        raise NumericError(f"{where}: module \"{shown}\": DoRA gives non-finite weights (a zero row norm of W + s B A)")
    delta = (D.T if t.layout == "fan_in_fan_out" else D.reshape(t.shape)).contiguous()
    return Target(key=t.key, kind="full", layout="full", shape=t.shape, delta=delta, delta_scale=1.0,
                  info={"peft": f"DoRA rank {b.rank}, scale {b.scale}: W' - W from the base, as PEFT merges it"})


def _whole_tensor(where, name, x, bk, info):
    """A saved whole tensor (modules_to_save, saved embedding layer) as a full target holding saved - base."""
    import torch

    from ..hostarray import as_torch

    key = name.removeprefix(PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.", ".")
    if bk is None:
        raise UnsupportedError(f"{where}: \"{escape(name)}\" is a whole saved tensor (modules_to_save or a saved "
                               "embedding layer) that replaces the base's; pass --base so loratool can store its "
                               "difference from the base")
    key = bk.resolve_dotted(key, f"{where}: \"{escape(name)}\"")
    if bk.shape(key) != tuple(x.shape):
        raise MismatchError(f"{where}: \"{escape(name)}\" is {list(x.shape)} but base \"{escape(key)}\" is "
                            f"{list(bk.shape(key))}")
    if not x.is_floating_point():
        raise UnsupportedError(f"{where}: \"{escape(name)}\" is {x.dtype}; only floating-point tensors can be stored "
                               "as deltas")
    delta = as_torch(x).to(torch.float32) - bk.read(key).to(torch.float32)  # exact for inputs of <= 24-bit mantissa
    if not bool(delta.any()):
        info.setdefault("unchanged_keys", []).append(name)  # saved copy equals the base: ΔW is zero
        return None
    return Target(key=key, kind="full", layout="full", shape=tuple(x.shape), delta=delta, delta_scale=1.0,
                  info={"peft": "whole tensor, stored as saved - base"})


# ---- writer --------------------------------------------------------------------------------------------

def _module_of(t: Target, suffix: str) -> str:
    if not t.key.endswith(suffix):
        raise UnsupportedError(f"target \"{escape(t.key)}\": PEFT adapts modules, so a LoRA target key must end in "
                               f"\"{suffix}\"")
    return t.key[: -len(suffix)]


def plan(adapter: Adapter, base_model_name_or_path: str | None = None) -> tuple[dict, dict]:
    """The adapter_config.json dict and name -> tensor that express `adapter` exactly in PEFT.

    Raises:
        UnsupportedError: a target PEFT cannot express (row/column blocks, several pairs, a full target that is
            not a lora bias, a lora bias beside an embedding target).
    """
    lora = [t for t in adapter if t.kind == "lora"]
    full = {t.key: t for t in adapter if t.kind == "full"}
    if not lora:
        raise UnsupportedError("adapter has no LoRA targets; a PEFT LoRA adapter needs at least one")
    for t in lora:
        if not t.is_whole:
            spans = ", ".join(f"rows {b.rows[0]}:{b.rows[1]} cols {b.cols[0]}:{b.cols[1]}" for b in t.blocks)
            raise UnsupportedError(f"target \"{escape(t.key)}\" has {len(t.blocks)} block(s) ({spans}); PEFT holds "
                                   "one A/B pair over the whole weight, so the conversion cannot be exact")
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
    for t in lora:
        b = t.blocks[0]
        module = _module_of(t, ".weight")
        modules.append(module)
        # re.escape makes the pattern match this module and no other (PEFT treats keys as regexes).
        if ranks[t.key] != r:
            rank_pattern[re.escape(module)] = ranks[t.key]
        if alphas[t.key] != alpha:
            alpha_pattern[re.escape(module)] = _num(alphas[t.key])
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
    lora_bias = False
    for key, ft in full.items():
        owner = adapter.targets.get(key[: -len(".bias")] + ".weight") if key.endswith(".bias") else None
        if owner is None or owner.kind != "lora" or owner.layout == "embedding" or tuple(ft.shape) != \
                (owner.matrix_shape[0],):
            raise UnsupportedError(f"target \"{escape(key)}\" is a whole-tensor delta; PEFT can hold one only as the "
                                   "lora_B bias of a LoRA module on the same layer, so the conversion cannot be exact")
        s = owner.blocks[0].scale if owner.blocks[0].scale_rule == rule else \
            scale_of(alphas[owner.key], ranks[owner.key], rule)
        vec = ft.delta if ft.delta_scale == s else (ft.delta.double() * (ft.delta_scale / s)).to(ft.delta.dtype)
        tensors[PREFIX + _module_of(owner, ".weight") + ".lora_B.bias"] = vec
        used_bias.add(owner.key)
        lora_bias = True
    if lora_bias:
        for t in lora:
            if t.key in used_bias:
                continue
            if t.layout == "embedding":
                raise UnsupportedError(f"target \"{escape(t.key)}\" is an embedding and PEFT's lora_bias is global but "
                                       "not allowed on embeddings, so the conversion cannot be exact")
            import torch

            ref = t.blocks[0].B
            tensors[PREFIX + _module_of(t, ".weight") + ".lora_B.bias"] = torch.zeros(ref.shape[0], dtype=ref.dtype)
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": _num(alpha), "use_rslora": rule == "rslora",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(modules), "fan_in_fan_out": any(t.layout == "fan_in_fan_out" for t in lora),
        "lora_bias": lora_bias, "bias": "none", "lora_dropout": 0.0, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }
    return cfg, tensors


def _majority(values):
    """The most frequent value; the smallest of those tied."""
    return sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def save(adapter: Adapter, path, *, overwrite: bool = False, base_model_name_or_path: str | None = None) -> int:
    """Write `adapter` as a PEFT folder (adapter_config.json + adapter_model.safetensors), atomically.

    Returns the bytes written. The caller checks the output against its inputs (fsutil.check_output).

    Raises:
        UnsupportedError: the adapter cannot be expressed in PEFT exactly (the message says which target, why).
        NumericError: a factor is not finite.
    """
    from ..fsutil import atomic_dir

    for t in adapter:
        for b in t.blocks:
            if b.A is None or b.B is None:
                raise SpecError(f"target \"{escape(t.key)}\": factors were never loaded; load the adapter with its "
                                "tensors first")
    _check_finite(adapter, tensors_of(adapter), str(path))
    cfg, tensors = plan(torch_factors(adapter), base_model_name_or_path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith("loratool.")}
    meta["format"] = "pt"
    with atomic_dir(path, overwrite=overwrite) as tmp:
        n = write_file(tmp / WEIGHTS_NAMES[0], tensors, meta)
        text = json.dumps(cfg, indent=2, sort_keys=True, allow_nan=False) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    return n + len(text.encode("utf-8"))


__all__ = ["load", "save", "plan", "read_config", "get_pattern_key"]
