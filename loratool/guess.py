"""What a set of tensors is for: the model family and model, guessed from key names and shapes alone, and the
training metadata a file carries. Headers only: no numpy, no torch.

The knowledge is one table, FAMILIES. A family has a signature (a key name that only its models use), probes
(which key gives which dimension, read from the (out, in) matrix of that key), and its models with the
dimensions that tell them apart. A guess measures every probe of every family whose signature some key
matches, keeps the models none of whose dimensions disagree, and ranks them by how many agree.

Key names are compared normalised: without a trailing ".weight"/".bias" and with every "." written "_", so
PEFT (`model.layers.0.self_attn.q_proj`), kohya (`lora_unet_double_blocks_0_img_attn_qkv`), diffusers
(`unet.down_blocks.0....attn2.to_k`) and whole models read alike. The names were checked against
kohya-ss/sd-scripts (networks/lora.py, lora_flux.py, lora_sd3.py, library/sai_model_spec.py), diffusers
(loaders/lora_conversion_utils.py) and transformers' model definitions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from .container import loads_json


@dataclass(frozen=True)
class Probe:
    """`dim` is read from the (out, in) matrix of every key matching `pattern`: its "out" or "in" size, or the
    "min"/"max" of the two (orientation-free: a GPT-2 Conv1D weight is stored (in, out))."""

    dim: str
    pattern: str
    axis: str


@dataclass(frozen=True)
class Model:
    """A model: the dimensions that identify it (a value or a tuple of accepted values) and a regular
    expression for the names metadata gives it (ss_base_model_version, base_model_name_or_path, ...)."""

    name: str
    dims: Mapping[str, object]
    aka: str = ""


@dataclass(frozen=True)
class Family:
    """A model family. `primary` families (LLMs, diffusion backbones) outrank the text-encoder-only family,
    whose keys also sit beside FLUX and SD3 backbones."""

    name: str
    what: str  # evidence wording for keys matching the signature
    signature: str
    probes: tuple[Probe, ...]
    models: tuple[Model, ...]
    aka: str = ""  # names metadata and config.json (model_type) give the family
    primary: bool = True


_LAYER = r"(?:^|(?<!encoder)_)layers_\d+_"  # decoder layers (a CLIP text encoder's are encoder_layers)
_TE = r"^(?:lora_te1?_|text_encoder_)text_model_encoder_layers_\d+_"
_TE2 = r"^(?:lora_te2_|text_encoder_2_)text_model_encoder_layers_\d+_"
_TE_PROBES = (Probe("te", _TE + r"self_attn_[qkvo]_proj$", "out"), Probe("te", _TE + r"mlp_fc1$", "in"),
              Probe("te2", _TE2 + r"self_attn_[qkvo]_proj$", "out"), Probe("te2", _TE2 + r"mlp_fc1$", "in"))

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama", "Llama-style decoder names (layers.N.self_attn / mlp projections)",
        _LAYER + r"(?:self_attn_(?:[qkvo]|qkv)_proj|mlp_(?:gate|up|down|gate_up)_proj)$",
        (Probe("hidden", _LAYER + r"self_attn_o_proj$", "out"), Probe("hidden", _LAYER + r"self_attn_q_proj$", "in"),
         Probe("hidden", _LAYER + r"self_attn_qkv_proj$", "in"), Probe("hidden", _LAYER + r"mlp_down_proj$", "out"),
         Probe("hidden", r"(?:^|_)embed_tokens$", "min"),
         Probe("kv", _LAYER + r"self_attn_[kv]_proj$", "out"),
         Probe("inter", _LAYER + r"mlp_(?:gate|up)_proj$", "out"), Probe("inter", _LAYER + r"mlp_down_proj$", "in"),
         Probe("qkv", _LAYER + r"self_attn_qkv_proj$", "out"), Probe("gate_up", _LAYER + r"mlp_gate_up_proj$", "out"),
         Probe("vocab", r"(?:^|_)(?:embed_tokens|lm_head)$", "max")),
        (Model("TinyLlama-1.1B", {"hidden": 2048, "kv": 256, "inter": 5632, "vocab": 32000}, r"tinyllama"),
         Model("Llama-3.2-1B", {"hidden": 2048, "kv": 512, "inter": 8192, "vocab": 128256}, r"llama-?3\.2-1b"),
         Model("Gemma-2B", {"hidden": 2048, "kv": 256, "inter": 16384, "vocab": 256000}, r"gemma-2b"),
         Model("Llama-3.2-3B", {"hidden": 3072, "kv": 1024, "inter": 8192, "vocab": 128256}, r"llama-?3\.2-3b"),
         Model("Phi-3-mini", {"hidden": 3072, "qkv": 9216, "gate_up": 16384, "vocab": (32064, 32011)}, r"phi-?3"),
         Model("Gemma-7B", {"hidden": 3072, "kv": 4096, "inter": 24576, "vocab": 256000}, r"gemma-7b"),
         Model("Qwen2-7B", {"hidden": 3584, "kv": 512, "inter": 18944, "vocab": (152064, 151936)},
               r"qwen2(?:\.5)?-7b"),
         Model("Llama-2-7B", {"hidden": 4096, "kv": 4096, "inter": 11008, "vocab": 32000}, r"llama-?2-7b"),
         Model("Llama-3-8B", {"hidden": 4096, "kv": 1024, "inter": 14336, "vocab": 128256},
               r"llama-?3(?:\.1)?-8b"),
         Model("Mistral-7B", {"hidden": 4096, "kv": 1024, "inter": 14336, "vocab": (32000, 32768)}, r"mistral-7b"),
         Model("Llama-2-13B", {"hidden": 5120, "kv": 5120, "inter": 13824, "vocab": 32000}, r"llama-?2-13b"),
         Model("Llama-2-70B", {"hidden": 8192, "kv": 1024, "inter": 28672, "vocab": 32000}, r"llama-?2-70b"),
         Model("Llama-3-70B", {"hidden": 8192, "kv": 1024, "inter": 28672, "vocab": 128256},
               r"llama-?3(?:\.[13])?-70b")),
        aka=r"llama|mistral|qwen|gemma|phi-?3"),
    Family(
        "gpt2", "GPT-2 names (h.N.attn.c_attn, mlp.c_fc: Conv1D)",
        r"(?:^|_)h_\d+_(?:attn_c_attn|attn_c_proj|mlp_c_fc|mlp_c_proj)$",
        (Probe("hidden", r"(?:^|_)h_\d+_attn_c_attn$", "min"), Probe("hidden", r"(?:^|_)h_\d+_attn_c_proj$", "min"),
         Probe("hidden", r"(?:^|_)wte$", "min"), Probe("inter", r"(?:^|_)h_\d+_mlp_c_fc$", "max"),
         Probe("vocab", r"(?:^|_)wte$", "max")),
        (Model("GPT-2 (124M)", {"hidden": 768, "inter": 3072}, r"^(?:openai-community/)?gpt2$"),
         Model("GPT-2 Medium", {"hidden": 1024, "inter": 4096}, r"gpt2-medium"),
         Model("GPT-2 Large", {"hidden": 1280, "inter": 5120}, r"gpt2-large"),
         Model("GPT-2 XL", {"hidden": 1600, "inter": 6400}, r"gpt2-xl")),
        aka=r"gpt2"),
    Family(
        "stable-diffusion", "Stable Diffusion UNet names (down/up/input/output blocks, attn1/attn2)",
        r"(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_\d*_?.*"
        r"(?:attn[12]_to_(?:[qkv]|out)|proj_in|proj_out|ff_net|resnets|conv[12]?|emb_layers|in_layers|out_layers)",
        (Probe("context", r"attn2_to_[kv]$", "in"),) + _TE_PROBES,
        (Model("Stable Diffusion 1.x (1.5)", {"context": 768, "te": 768},
               r"sd_?v?1(?![0-9])|stable-diffusion-v1|v1-5|sd15|sd1\.5"),
         Model("Stable Diffusion 2.x", {"context": 1024, "te": 1024}, r"sd_?v?2(?![0-9])|stable-diffusion-v2|sd21?"),
         Model("SDXL 1.0", {"context": 2048, "te": 768, "te2": 1280}, r"sdxl|stable-diffusion-xl")),
        aka=r"sd_?v?[12](?![0-9])|stable-diffusion-v[12]|sdxl|stable-diffusion-xl|sd15|sd1\.5"),
    Family(
        "flux", "FLUX transformer names (double_blocks / single_blocks)",
        r"(?:^|_)(?:double_blocks|single_blocks|single_transformer_blocks)_\d+_",
        (Probe("hidden", r"double_blocks_\d+_img_attn_qkv$", "in"), Probe("hidden", r"double_blocks_\d+_img_attn_proj$",
                                                                            "out"),
         Probe("hidden", r"single_blocks_\d+_linear2$", "out"),
         Probe("hidden", r"(?:^|_)(?:single_)?transformer_blocks_\d+_attn_to_[qkv]$", "in")) + _TE_PROBES,
        (Model("FLUX.1 (dev or schnell)", {"hidden": 3072, "te": 768}, r"flux"),),
        aka=r"flux"),
    Family(
        "sd3", "SD3 MMDiT names (joint_blocks / transformer_blocks with add_q_proj)",
        r"(?:^|_)joint_blocks_\d+_|(?:^|_)transformer_blocks_\d+_attn_add_[qkv]_proj$",
        (Probe("hidden", r"joint_blocks_\d+_[xc]\w*_block_attn_qkv$", "in"),
         Probe("hidden", r"joint_blocks_\d+_x_block_attn_proj$", "out"),
         Probe("hidden", r"(?:^|_)transformer_blocks_\d+_attn_to_[qkv]$", "in")) + _TE_PROBES,
        (Model("SD3 Medium / SD3.5 Medium", {"hidden": 1536, "te": 768, "te2": 1280},
               r"stable-diffusion-3(?:-medium|-5-medium)?(?:/|$)|sd3(?:\.5)?[-_]?m"),
         Model("SD3.5 Large", {"hidden": 2432, "te": 768, "te2": 1280}, r"3[.-]5[-_]large|sd35[-_]?large")),
        aka=r"stable-diffusion-3|sd3"),
    Family(
        "clip-text-encoder", "CLIP text-encoder names (text_model.encoder.layers)", _TE[1:] + "|" + _TE2[1:],
        _TE_PROBES,
        (Model("Stable Diffusion 1.x (CLIP ViT-L text encoder)", {"te": 768}),
         Model("Stable Diffusion 2.x (OpenCLIP ViT-H text encoder)", {"te": 1024}),
         Model("SDXL (CLIP ViT-L + OpenCLIP ViT-bigG text encoders)", {"te": 768, "te2": 1280})),
        primary=False),
)

DIM_WORDS = {"hidden": "hidden size", "kv": "k/v projection width", "inter": "MLP intermediate size",
             "vocab": "vocabulary", "qkv": "fused qkv width", "gate_up": "fused gate_up width",
             "context": "cross-attention context width", "te": "text encoder width",
             "te2": "second text encoder width"}

# Metadata and config fields that name the base model, in the order they are believed.
DECLARING = ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name", "base_model_name_or_path",
             "model_type", "architectures")

_COMPILED: dict[str, re.Pattern] = {}


def _re(pattern: str) -> re.Pattern:
    if pattern not in _COMPILED:
        _COMPILED[pattern] = re.compile(pattern, re.I)
    return _COMPILED[pattern]


def normalise(key: str) -> str:
    """A key as the table matches it: no trailing .weight/.bias, every "." written "_"."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
            break
    return key.replace(".", "_")


def _axis(shape: tuple[int, int], axis: str) -> int:
    out, inp = shape
    return {"out": out, "in": inp, "min": min(out, inp), "max": max(out, inp)}[axis]


def _measure(family: Family, keys: dict[str, tuple[int, int]]) -> dict[str, tuple[int, str, int]]:
    """dim -> (most frequent value, a key it was read from, how many keys gave it)."""
    seen: dict[str, Counter] = {}
    where: dict[tuple[str, int], str] = {}
    for p in family.probes:
        rx = _re(p.pattern)
        for k, shape in keys.items():
            if rx.search(k):
                v = _axis(shape, p.axis)
                seen.setdefault(p.dim, Counter())[v] += 1
                where.setdefault((p.dim, v), k)
    return {d: (c.most_common(1)[0][0], where[(d, c.most_common(1)[0][0])], c.most_common(1)[0][1])
            for d, c in seen.items()}


def _fits(want, value: int) -> bool:
    return value in want if isinstance(want, tuple) else value == want


def guess(shapes: Mapping[str, tuple[int, ...]], declared: Mapping[str, object] | None = None) -> dict:
    """What model the tensors named in `shapes` belong to (an adapter's targets or a model's weights).

    Args:
        shapes: key -> the (out, in) matrix shape of the weight the key adapts or holds (a conv kernel's trailing
            dimensions folded into in); 0-d and 1-d entries are ignored.
        declared: metadata or config fields that may name the base (DECLARING: modelspec.architecture,
            ss_base_model_version, base_model_name_or_path, model_type, ...), used as evidence.
    Returns:
        {"family", "model" (a name, "A or B" when the keys cannot tell them apart, or None), "confidence"
        ("high", "medium", "low" or "none"), "evidence" (sentences), "dims" (what was measured: dim -> value),
        "declared" (the first declaring field as "key = value", or None)}.
    """
    keys, original = {}, {}
    for k, s in shapes.items():
        if len(s) >= 2:
            n = 1
            for d in s[1:]:
                n *= int(d)
            keys[normalise(k)] = (int(s[0]), n)
            original[normalise(k)] = k
    said = [(f, str(declared[f])) for f in DECLARING if declared and declared.get(f) not in (None, "", "None")]
    said_text = " ".join(v for _, v in said)
    ranked = []
    for fam in FAMILIES:
        sig = _re(fam.signature)
        hits = sum(1 for k in keys if sig.search(k))
        fam_said = bool(fam.aka and said_text and _re(fam.aka).search(said_text))
        if not hits and not fam_said:
            continue
        dims = _measure(fam, keys)
        fits = []
        for m in fam.models:
            agree = [d for d in m.dims if d in dims and _fits(m.dims[d], dims[d][0])]
            if any(d in dims and not _fits(m.dims[d], dims[d][0]) for d in m.dims):
                continue
            named = bool(m.aka and said_text and _re(m.aka).search(said_text))
            fits.append((len(agree), named, m, agree))
        ranked.append((fam.primary, bool(hits), max((f[0] for f in fits), default=0), fam_said, hits, fam, dims,
                       fits))
    if not ranked:
        return {"family": None, "model": None, "confidence": "none", "dims": {},
                "evidence": ["no key name of a model family loratool knows"],
                "declared": f"{said[0][0]} = {said[0][1]}" if said else None}
    ranked.sort(key=lambda r: r[:5], reverse=True)
    primary, has_hits, best_agree, fam_said, hits, fam, dims, fits = ranked[0]
    evidence = [f"{hits} of {len(keys)} keys have {fam.what}"] if hits else []
    for d, (v, k, n) in sorted(dims.items()):
        evidence.append(f"{DIM_WORDS.get(d, d)} {v} (from {original[k]}{f' and {n - 1} more' if n > 1 else ''})")
    top = [f for f in fits if f[0] == best_agree] if best_agree else []
    if any(f[1] for f in top):
        top = [f for f in top if f[1]]  # metadata breaks a tie the shapes leave
    model = " or ".join(f[2].name for f in top) or None
    if not has_hits:
        confidence = "low"  # metadata alone
        evidence.append("no key names of this family: only the metadata names it")
    elif model is None:
        confidence = "low"
        evidence.append(f"a {fam.name} model whose dimensions are not in loratool's table")
    elif len(top) == 1 and (best_agree >= 2 or top[0][1] or len(top[0][2].dims) == best_agree):
        confidence = "high"
    else:
        confidence = "medium"
    if said:
        field, value = said[0]
        if any(f[1] for f in top) or (fam_said and top and not any(f[2].aka for f in top)):
            evidence.append(f"metadata {field} = {value} agrees")
        elif fam_said:
            evidence.append(f"metadata {field} = {value} names this family")
        else:
            evidence.append(f"metadata {field} = {value} does not fit the keys")
            confidence = {"high": "medium", "medium": "low"}.get(confidence, confidence)
    return {"family": fam.name, "model": model, "confidence": confidence,
            "dims": {d: v[0] for d, v in sorted(dims.items())}, "evidence": evidence,
            "declared": f"{said[0][0]} = {said[0][1]}" if said else None}


# ---- training metadata ------------------------------------------------------------------------------------

KOHYA_FIELDS = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module",
                "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images",
                "ss_epoch", "ss_learning_rate")
PEFT_FIELDS = ("base_model_name_or_path", "task_type", "peft_version")
MAX_VALUE = 300  # characters of a metadata value shown (modelspec.thumbnail is a whole data: URL)
TOP_TAGS = 10


def _short(value: str) -> str:
    return value if len(value) <= MAX_VALUE else f"{value[:MAX_VALUE]}... ({len(value)} characters)"


def trigger_words(tag_frequency: str | None, top: int = TOP_TAGS) -> tuple[list[list], str | None]:
    """The `top` most frequent tags of kohya's ss_tag_frequency ({dataset: {tag: count}} as a JSON string),
    counts summed over datasets, as [[tag, count], ...] (most frequent first, then by tag); and a note when the
    value is not that JSON (None otherwise)."""
    if not tag_frequency:
        return [], None
    try:
        doc = loads_json(tag_frequency)
    except ValueError as e:
        return [], f"ss_tag_frequency is not valid JSON ({e})"
    if not isinstance(doc, dict):
        return [], "ss_tag_frequency is not a JSON object of dataset -> {tag: count}"
    counts: Counter = Counter()
    for tags in doc.values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                if isinstance(n, (int, float)) and not isinstance(n, bool) and str(tag).strip():
                    counts[str(tag).strip()] += n
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [[t, int(n) if float(n).is_integer() else n] for t, n in best], None


def training(metadata: Mapping[str, str], peft_config: Mapping | None = None) -> dict:
    """What a file says about its training: kohya `ss_*` fields, the top ss_tag_frequency tags as trigger words,
    `modelspec.*` keys, and PEFT's base_model_name_or_path / task_type / peft_version. Empty groups are left
    out; long values are cut at MAX_VALUE characters.

    Args:
        metadata: the safetensors header's metadata (str -> str).
        peft_config: adapter_config.json as a dict, for a PEFT adapter.
    Returns:
        {"kohya": {...}, "trigger_words": [[tag, count], ...], "modelspec": {...}, "peft": {...}, "notes": [...]},
        each present only when it has something.
    """
    out: dict = {}
    kohya = {k: _short(str(metadata[k])) for k in KOHYA_FIELDS if metadata.get(k) not in (None, "", "None")}
    if kohya:
        out["kohya"] = kohya
    tags, note = trigger_words(metadata.get("ss_tag_frequency"))
    if tags:
        out["trigger_words"] = tags
    if note:
        out["notes"] = [note]
    spec = {k: _short(str(v)) for k, v in sorted(metadata.items()) if k.startswith("modelspec.") and v}
    if spec:
        out["modelspec"] = spec
    if peft_config:
        peft = {k: peft_config[k] for k in PEFT_FIELDS if peft_config.get(k) not in (None, "")}
        if peft:
            out["peft"] = {k: _short(str(v)) for k, v in peft.items()}
    return out


__all__ = ["FAMILIES", "Family", "Model", "Probe", "guess", "normalise", "training", "trigger_words"]
