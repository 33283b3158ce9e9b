"""`loratool.check_runtime`: what a serving runtime will refuse, or silently apply differently, in an adapter.

Each runtime is a list of rules; each rule reads the adapter's structure (registry.structure: headers and
configs, never a tensor) and, for a PEFT folder, its adapter_config.json, and cites the runtime's code that
makes it so (docs/runtimes.md lists them all). What only the served model can decide (which module names it
has, its vocabulary size, tied embeddings) is named in the rule and never guessed.

Severity: "error" when the runtime refuses the adapter or applies a different ΔW than the adapter defines;
"warning" when it loads correctly only with a setting, or when the outcome depends on the served model.

    findings = check_runtime("peft_dir/", "vllm")
    [f.as_dict() for f in findings]   # {"id", "severity", "message", "source", "targets"}
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..adapter import Adapter, scale_of
from ..errors import UnsupportedError
from ..io.kohya import ALPHA_MISSING, ALPHA_ZERO

VLLM, LCPP = "vllm-project/vllm", "ggml-org/llama.cpp"
DIFF, COMFY = "huggingface/diffusers", "comfyanonymous/ComfyUI"

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]; LoRAConfig.max_lora_rank = 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Kohya prefixes each loader maps: diffusers' SD/SDXL loader converts a file only when every key has one of
# these (lora_pipeline.py StableDiffusionLoraLoaderMixin.lora_state_dict); ComfyUI builds key maps for these
# (comfy/lora.py model_lora_keys_unet, model_lora_keys_clip).
DIFFUSERS_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
COMFY_KOHYA_PREFIXES = ("lora_unet_", "lora_prior_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
                        "lora_prior_te_", "lora_transformer_", "lycoris_")
# Relative tolerance for "the same scale": scales are alpha / r of small integers, exact in float64.
SCALE_RTOL = 1e-9


@dataclass(frozen=True)
class Finding:
    """One thing a runtime refuses or mishandles: rule id, "error" or "warning", one-line message, the
    runtime's source that makes it so, and the target keys concerned (empty for the whole adapter)."""

    id: str
    severity: str
    message: str
    source: str
    targets: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"id": self.id, "severity": self.severity, "message": self.message, "source": self.source,
                "targets": list(self.targets)}


@dataclass(frozen=True)
class Subject:
    """What a rule sees: the dialect's name, the header-only adapter and a PEFT folder's config ({} otherwise)."""

    dialect: str
    adapter: Adapter
    config: dict = field(default_factory=dict)

    def lora(self):
        return [t for t in self.adapter if t.kind == "lora"]

    def full(self, what: str):
        """Full targets the PEFT reader made from `what`: "whole" (saved tensors) or "lora_B.bias"."""
        return [t for t in self.adapter if t.kind == "full" and str(t.info.get("peft", "")).startswith(what)]

    def dora(self):
        """The DoRA targets the PEFT reader made (lora_magnitude_vector with use_dora)."""
        return [t for t in self.adapter if t.is_dora and t.info.get("peft") == "DoRA"]

    def kohya_names_without(self, prefixes) -> list[str]:
        """The prefixes ("lora_te3_") of the kohya module names that start with none of `prefixes`."""
        names = [str(t.info["kohya_name"]) for t in self.adapter if "kohya_name" in t.info]
        return sorted({"_".join(n.split("_")[:2]) + "_" for n in names if not n.startswith(prefixes)})

    def config_scale(self) -> float | None:
        """The one scale a runtime that ignores rank_pattern/alpha_pattern applies: lora_alpha / r (or / √r)."""
        if "r" not in self.config or "lora_alpha" not in self.config:
            return None
        return scale_of(float(self.config["lora_alpha"]), int(self.config["r"]),
                        "rslora" if self.config.get("use_rslora") else "standard")


# A check returns None (nothing to report) or (message, target keys).
Check = Callable[[Subject], "tuple[str, list[str]] | None"]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    summary: str  # one line for docs/runtimes.md
    source: str  # repository, path and function of the runtime's code
    check: Check


@dataclass(frozen=True)
class Runtime:
    name: str
    title: str
    reads: tuple[str, ...]  # loratool dialects the runtime loads as they are
    format_rule: Rule  # fires when the dialect is not in `reads`; the other rules then do not run
    rules: tuple[Rule, ...]


def _keys(ts) -> list[str]:
    return [t.key for t in ts]


def _shown(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(f"\"{k}\"" for k in keys[:n]) + more


def _hit(ts, text: str):
    ts = list(ts)
    return (text.format(n=len(ts), keys=_shown(_keys(ts))), _keys(ts)) if ts else None


def _off_scale(s: Subject):
    """LoRA targets whose scale differs from the config's one lora_alpha / r (they use rank/alpha_pattern)."""
    g = s.config_scale()
    if g is None:
        return []
    return [t for t in s.lora() if any(not math.isclose(b.scale, g, rel_tol=SCALE_RTOL) for b in t.blocks)]


def _alpha_zero(s: Subject):
    return [t for t in s.lora() if t.info.get("alpha") == ALPHA_ZERO]


# ---- vLLM -----------------------------------------------------------------------------------------------

def _vllm_top_rank(s: Subject) -> tuple[int, list[str]]:
    """The largest rank of any module (vLLM sizes its buffers by it) and the modules that have it."""
    ranks = {t.key: max(b.rank for b in t.blocks) for t in s.lora()}
    top = max(ranks.values(), default=0)
    return top, [k for k, r in ranks.items() if r == top]


def _vllm_rank_error(s: Subject):
    top, keys = _vllm_top_rank(s)
    if top <= VLLM_MAX_LORA_RANKS[-1]:
        return None
    return (f"rank {top} (on {_shown(keys)}) is above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM "
            f"accepts; reduce it (loratool rescale ADAPTER -o out/ --rank {VLLM_MAX_LORA_RANKS[-1]})", keys)


def _vllm_rank_warning(s: Subject):
    top, keys = _vllm_top_rank(s)
    if not VLLM_DEFAULT_MAX_LORA_RANK < top <= VLLM_MAX_LORA_RANKS[-1]:
        return None
    fit = next(r for r in VLLM_MAX_LORA_RANKS if r >= top)
    return (f"rank {top} (on {_shown(keys)}) is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: "
            f"serve with --max-lora-rank {fit} (it takes {', '.join(map(str, VLLM_MAX_LORA_RANKS))})", keys)


def _vllm_dora(s: Subject):
    ts = s.dora()
    if ts or s.config.get("use_dora"):
        return (f"DoRA adapter (use_dora, {len(ts)} module(s)): vLLM refuses it (\"vLLM does not yet support DoRA.\"); "
                "merge it into the model instead (loratool merge MODEL ADAPTER -o merged/)", _keys(ts))
    return None


def _vllm_saved(s: Subject):
    ts = s.full("whole")
    mts = s.config.get("modules_to_save")
    if not ts and not mts:
        return None
    what = f"modules_to_save {mts}" if mts else f"{len(ts)} whole saved tensor(s) ({_shown(_keys(ts))})"
    return (f"{what}: vLLM refuses it (\"vLLM only supports modules_to_save being None.\", and tensors other than "
            "lora_A/lora_B are \"unsupported LoRA weight\"); merge the adapter into the model instead", _keys(ts))


def _vllm_bias(s: Subject):
    ts = s.full("lora_B.bias")
    bias = s.config.get("bias", "none")
    if not ts and bias in (None, "none"):
        return None
    what = f"bias \"{bias}\"" if bias not in (None, "none") else f"lora_bias ({len(ts)} lora_B.bias tensor(s))"
    return (f"{what}: vLLM refuses adapter biases (\"Adapter bias is not supported.\", and lora_B.bias is an "
            "\"unsupported LoRA weight\"); merge the adapter into the model instead", _keys(ts))


def _vllm_pattern(s: Subject):
    ts = _off_scale(s)
    return _hit(ts, f"{{n}} module(s) ({{keys}}) have their own rank or alpha (rank_pattern/alpha_pattern): vLLM "
                    f"applies the config's one lora_alpha / r = {s.config_scale():g} to every module, so their "
                    "strength changes silently; retrain or merge with one rank and alpha") if ts else None


def _vllm_conv(s: Subject):
    return _hit([t for t in s.lora() if t.layout == "conv"],
                "{n} convolution target(s) ({keys}): vLLM applies LoRA to linear, embedding and MoE layers only and "
                "refuses other modules (\"expected target modules in ...\")")


def _vllm_embedding(s: Subject):
    ts = [t for t in s.lora() if t.layout == "embedding"]
    if not ts:
        return None
    sizes = sorted({t.shape[0] for t in ts})
    return (f"embedding LoRA on {_shown(_keys(ts))}: vLLM refuses it unless the served model's vocabulary size is "
            f"{' or '.join(map(str, sizes))} (the width of lora_embedding_A); the model decides", _keys(ts))


VLLM_RUNTIME = Runtime(
    name="vllm", title="vLLM", reads=("peft",),
    format_rule=Rule("VLLM001", "error", "vLLM loads a PEFT folder only (adapter_config.json + adapter_model.*)",
                     f"{VLLM} vllm/lora/lora_model.py LoRAModel.from_local_checkpoint; vllm/lora/peft_helper.py "
                     "PEFTHelper.from_local_dir", lambda s: None),
    rules=(
        Rule("VLLM002", "error", "a rank above 512, the largest --max-lora-rank",
             f"{VLLM} vllm/config/lora.py MaxLoRARanks; vllm/lora/peft_helper.py PEFTHelper.validate_legal",
             _vllm_rank_error),
        Rule("VLLM003", "warning", "a rank above the default --max-lora-rank 16: serve with the next allowed value",
             f"{VLLM} vllm/config/lora.py LoRAConfig.max_lora_rank; vllm/lora/peft_helper.py PEFTHelper.validate_legal",
             _vllm_rank_warning),
        Rule("VLLM004", "error", "DoRA (use_dora, lora_magnitude_vector) is refused",
             f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._validate_features", _vllm_dora),
        Rule("VLLM005", "error", "modules_to_save and whole saved tensors are refused",
             f"{VLLM} vllm/lora/peft_helper.py PEFTHelper._validate_features; vllm/lora/utils.py "
             "parse_fine_tuned_lora_name", _vllm_saved),
        Rule("VLLM006", "error", "adapter biases (bias != \"none\", lora_B.bias) are refused",
             f"{VLLM} vllm/lora/peft_helper.py PEFTHelper.validate_legal; vllm/lora/utils.py parse_fine_tuned_lora_name",
             _vllm_bias),
        Rule("VLLM007", "error", "rank_pattern/alpha_pattern are ignored: one lora_alpha / r (or / √r) for every module",
             f"{VLLM} vllm/lora/peft_helper.py PEFTHelper.__post_init__; vllm/lora/lora_weights.py "
             "LoRALayerWeights.from_config", _vllm_pattern),
        Rule("VLLM008", "error", "LoRA on convolutions is refused (linear, embedding and MoE layers only)",
             f"{VLLM} vllm/lora/utils.py get_supported_lora_modules; vllm/lora/lora_model.py "
             "LoRAModel.from_local_checkpoint check_unexpected_modules", _vllm_conv),
        Rule("VLLM009", "warning", "embedding LoRA needs the served vocabulary size to equal lora_embedding_A's width",
             f"{VLLM} vllm/lora/lora_model.py LoRAModel.from_lora_tensors", _vllm_embedding),
    ))


# ---- llama.cpp ------------------------------------------------------------------------------------------

def _lcpp_base(s: Subject):
    if s.config.get("base_model_name_or_path"):
        return None
    return ("adapter_config.json names no base_model_name_or_path: convert_lora_to_gguf.py stops unless given the "
            "base's config folder (--base DIR) or --base-model-id", [])


def _lcpp_dora(s: Subject):
    ts = s.dora()
    return _hit(ts, "DoRA module(s) ({keys}): convert_lora_to_gguf.py stops at lora_magnitude_vector (\"Unexpected "
                    "name ...: Not a lora_A or lora_B tensor\"); merge the adapter into the model instead")


def _is_norm(key: str) -> bool:
    return "_layernorm" in key or ".norm" in key


def _lcpp_saved(s: Subject):
    ts = [t for t in s.full("whole") if not _is_norm(t.key)]
    return _hit(ts, "{n} whole saved tensor(s) ({keys}, modules_to_save): convert_lora_to_gguf.py stops at them "
                    "(\"Not a lora_A or lora_B tensor\"; embeddings: \"new tokens added during fine tuning\")")


def _lcpp_norm(s: Subject):
    ts = [t for t in s.full("whole") if _is_norm(t.key)]
    return _hit(ts, "{n} saved norm tensor(s) ({keys}): converted, but llama.cpp skips \"_norm.weight\" tensors when "
                    "it loads the adapter, so their change is silently lost")


def _lcpp_bias(s: Subject):
    return _hit(s.full("lora_B.bias"), "{n} lora_B.bias tensor(s) ({keys}): convert_lora_to_gguf.py stops at them "
                                       "(\"Not a lora_A or lora_B tensor\")")


def _lcpp_alpha(s: Subject):
    if "lora_alpha" not in s.config:
        return None
    a = float(s.config["lora_alpha"])
    ts = [t for t in s.lora() if any(b.alpha != a for b in t.blocks)]
    return _hit(ts, f"{{n}} module(s) ({{keys}}) have their own alpha (alpha_pattern): the GGUF file holds one "
                    f"adapter.lora.alpha = {a:g} and llama.cpp scales every tensor by it / rank, so their strength "
                    "changes silently")


def _lcpp_rslora(s: Subject):
    if not s.config.get("use_rslora"):
        return None
    ts = s.lora()
    return (f"use_rslora: llama.cpp scales by alpha / r, not alpha / √r, so every module is √r times too weak "
            f"({len(ts)} module(s)); before converting, set lora_alpha to lora_alpha·√r and use_rslora to false in a "
            "copy of the folder (one r; with rank_pattern the ranks differ and one alpha cannot fix them all)",
            _keys(ts))


def _lcpp_alpha_zero(s: Subject):
    if s.config.get("lora_alpha", None) != 0:
        return None
    return ("lora_alpha is 0: PEFT applies nothing, but llama.cpp reads alpha 0 as \"no alpha\" and applies the "
            "factors at scale 1", _keys(s.lora()))


def _lcpp_lm_head(s: Subject):
    ts = [t for t in s.lora() if t.key.endswith("lm_head.weight")]
    return _hit(ts, "LoRA on lm_head ({keys}): convert_lora_to_gguf.py refuses it when the model ties lm_head to the "
                    "token embeddings (\"lm_head is present in adapter, but is ignored in base model\"); the model "
                    "decides")


LCPP_RUNTIME = Runtime(
    name="llama.cpp", title="llama.cpp (convert_lora_to_gguf.py, then llama_adapter_lora_init)", reads=("peft",),
    format_rule=Rule("LCPP001", "error", "convert_lora_to_gguf.py reads a PEFT folder only",
                     f"{LCPP} convert_lora_to_gguf.py __main__ (adapter_config.json, adapter_model.safetensors/.bin)",
                     lambda s: None),
    rules=(
        Rule("LCPP002", "warning", "no base_model_name_or_path: the converter needs --base or --base-model-id",
             f"{LCPP} convert_lora_to_gguf.py __main__", _lcpp_base),
        Rule("LCPP003", "error", "DoRA (lora_magnitude_vector) stops the converter",
             f"{LCPP} convert_lora_to_gguf.py LoraModel.get_tensors", _lcpp_dora),
        Rule("LCPP004", "error", "whole saved tensors (modules_to_save) stop the converter",
             f"{LCPP} convert_lora_to_gguf.py LoraModel.get_tensors", _lcpp_saved),
        Rule("LCPP005", "error", "saved norm tensors are converted but skipped when llama.cpp loads the adapter",
             f"{LCPP} src/llama-adapter.cpp llama_adapter_lora_init_impl (\"_norm.weight\" skipped)", _lcpp_norm),
        Rule("LCPP006", "error", "lora_B.bias (lora_bias) stops the converter",
             f"{LCPP} convert_lora_to_gguf.py LoraModel.get_tensors", _lcpp_bias),
        Rule("LCPP007", "error", "alpha_pattern is ignored: one adapter.lora.alpha per file, scale alpha / rank per tensor",
             f"{LCPP} convert_lora_to_gguf.py __main__ (alpha = lparams[\"lora_alpha\"]); src/llama-adapter.h "
             "llama_adapter_lora_weight::get_scale", _lcpp_alpha),
        Rule("LCPP008", "error", "use_rslora is ignored: alpha / r instead of alpha / √r",
             f"{LCPP} convert_lora_to_gguf.py LoraModel.set_gguf_parameters; src/llama-adapter.h "
             "llama_adapter_lora_weight::get_scale", _lcpp_rslora),
        Rule("LCPP009", "error", "lora_alpha 0 is read as \"no alpha\" (scale 1) instead of scale 0",
             f"{LCPP} src/llama-adapter.h llama_adapter_lora_weight::get_scale", _lcpp_alpha_zero),
        Rule("LCPP010", "warning", "lm_head LoRA is refused when the model ties lm_head to the embeddings",
             f"{LCPP} convert_lora_to_gguf.py LoraModel.modify_tensors", _lcpp_lm_head),
    ))


# ---- diffusers ------------------------------------------------------------------------------------------

def _diff_prefix(s: Subject):
    other = s.kohya_names_without(DIFFUSERS_KOHYA_PREFIXES)
    if not other:
        return None
    return (f"kohya prefix(es) {', '.join(other)}: the Stable Diffusion (XL) loader converts kohya names only when "
            f"every key starts with {', '.join(DIFFUSERS_KOHYA_PREFIXES)}; other pipelines (Flux, ...) use their own "
            "converters in lora_conversion_utils.py", [])


def _diff_mixed_alpha(s: Subject):
    # The file's alpha tensors, as diffusers collects them into network_alphas (an alpha of 0 included).
    alphas = Counter(0.0 if t.info.get("alpha") == ALPHA_ZERO else b.alpha
                     for t in s.lora() if t.info.get("alpha") != ALPHA_MISSING for b in t.blocks)
    if not alphas:
        return None  # no alpha anywhere: diffusers uses alpha = rank, as sd-scripts does
    common = alphas.most_common(1)[0][0]
    ts = [t for t in s.lora() if t.info.get("alpha") == ALPHA_MISSING and any(b.rank != common for b in t.blocks)]
    return _hit(ts, f"{{n}} module(s) without an alpha ({{keys}}) get the file's most common alpha {common:g} in "
                    "diffusers, not alpha = rank as in sd-scripts, so their strength changes; write the alphas "
                    "(loratool convert FILE -o out.safetensors --to kohya)")


def _diff_alpha_zero(s: Subject):
    return _hit(_alpha_zero(s), "{n} module(s) with alpha 0 ({keys}): sd-scripts reads it as alpha = rank, diffusers "
                                "as scale 0 (the module does nothing); write the alphas (loratool convert FILE -o "
                                "out.safetensors --to kohya)")


def _diff_split(s: Subject):
    return _hit([t for t in s.lora() if "split_dims" in t.info],
                "{n} split_dims module(s) ({keys}, numbered lora_down.<i>.weight): no diffusers converter reads "
                "numbered factors (\"The following keys have not been correctly renamed\")")


DIFF_RUNTIME = Runtime(
    name="diffusers", title="diffusers (load_lora_weights)", reads=("kohya",),
    format_rule=Rule("DIFF001", "error", "diffusers reads kohya files and its own prefixed files; a PEFT folder's "
                     "base_model.model. keys are dropped", f"{DIFF} src/diffusers/loaders/peft.py "
                     "PeftAdapterMixin.load_lora_adapter (keys filtered by prefix); src/diffusers/loaders/"
                     "lora_pipeline.py StableDiffusionLoraLoaderMixin.lora_state_dict", lambda s: None),
    rules=(
        Rule("DIFF002", "warning", "kohya prefixes other than lora_unet_/lora_te_/lora_te1_/lora_te2_",
             f"{DIFF} src/diffusers/loaders/lora_pipeline.py StableDiffusionLoraLoaderMixin.lora_state_dict",
             _diff_prefix),
        Rule("DIFF003", "error", "a module without alpha gets the file's most common alpha, not alpha = rank",
             f"{DIFF} src/diffusers/loaders/lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers; "
             "src/diffusers/utils/peft_utils.py get_peft_kwargs", _diff_mixed_alpha),
        Rule("DIFF004", "error", "alpha 0 is applied as scale 0 (sd-scripts: alpha = rank)",
             f"{DIFF} src/diffusers/loaders/lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers; "
             "src/diffusers/utils/peft_utils.py get_peft_kwargs", _diff_alpha_zero),
        Rule("DIFF005", "error", "split_dims (numbered lora_down.<i>.weight) is not read",
             f"{DIFF} src/diffusers/loaders/lora_conversion_utils.py _convert_non_diffusers_lora_to_diffusers",
             _diff_split),
    ))


# ---- ComfyUI --------------------------------------------------------------------------------------------

def _comfy_peft_keys(s: Subject):
    if s.dialect != "peft":
        return None
    return ("PEFT keys (base_model.model.<module>.lora_A.weight) are in ComfyUI's key map for a few models only "
            "(SD3, HunyuanDiT, ...); for the others every key is printed as \"lora key not loaded\" and nothing is "
            "applied; the model decides", [])


def _comfy_peft_alpha(s: Subject):
    if s.dialect != "peft":
        return None
    ts = [t for t in s.lora() if any(not math.isclose(b.scale, 1.0, rel_tol=SCALE_RTOL) for b in t.blocks)]
    return _hit(ts, "{n} module(s) ({keys}) have scale != 1: ComfyUI never reads adapter_config.json and applies "
                    "a PEFT file's factors at scale 1, so their strength changes; write a kohya file, which "
                    "keeps each alpha (loratool convert ADAPTER -o out.safetensors --to kohya)")


def _comfy_prefix(s: Subject):
    if s.dialect != "kohya":
        return None
    other = s.kohya_names_without(COMFY_KOHYA_PREFIXES)
    return (f"kohya prefix(es) {', '.join(other)} are in none of ComfyUI's key maps: their keys are printed as "
            "\"lora key not loaded\" and skipped", []) if other else None


def _comfy_alpha_zero(s: Subject):
    return _hit(_alpha_zero(s), "{n} module(s) with alpha 0 ({keys}): sd-scripts reads it as alpha = rank, ComfyUI "
                                "as scale 0 (the module does nothing); write the alphas (loratool convert FILE -o "
                                "out.safetensors --to kohya)")


def _comfy_split(s: Subject):
    return _hit([t for t in s.lora() if "split_dims" in t.info],
                "{n} split_dims module(s) ({keys}, numbered lora_down.<i>.weight): ComfyUI reads only "
                "<name>.lora_up.weight/lora_down.weight, so these print \"lora key not loaded\" and are skipped")


def _comfy_full(s: Subject):
    ts = s.full("whole") + s.full("lora_B.bias")
    return _hit(ts, "{n} whole-tensor change(s) ({keys}: modules_to_save or lora_B.bias): ComfyUI reads those only as "
                    ".diff/.diff_b/.set_weight, so they print \"lora key not loaded\" and are skipped")


def _comfy_dora(s: Subject):
    return _hit(s.dora(), "{n} DoRA module(s) ({keys}): ComfyUI reads a DoRA magnitude only as dora_scale; "
                                "PEFT's lora_magnitude_vector is skipped (\"lora key not loaded\") and the module "
                                "is applied as plain LoRA")


COMFY_RUNTIME = Runtime(
    name="comfyui", title="ComfyUI (LoraLoader)", reads=("kohya", "peft"),
    format_rule=Rule("COMFY001", "error", "ComfyUI reads kohya and prefixed diffusers/PEFT files; other names are "
                     "\"lora key not loaded\"", f"{COMFY} comfy/lora.py load_lora, model_lora_keys_unet, "
                     "model_lora_keys_clip", lambda s: None),
    rules=(
        Rule("COMFY002", "warning", "PEFT keys are mapped for a few models only (SD3, HunyuanDiT, ...)",
             f"{COMFY} comfy/lora.py model_lora_keys_unet", _comfy_peft_keys),
        Rule("COMFY003", "error", "a PEFT file's lora_alpha is never read: scale 1 (alpha = rank)",
             f"{COMFY} comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight (alpha None -> 1.0)",
             _comfy_peft_alpha),
        Rule("COMFY004", "warning", "kohya prefixes outside ComfyUI's key maps are skipped",
             f"{COMFY} comfy/lora.py model_lora_keys_unet, model_lora_keys_clip, load_lora", _comfy_prefix),
        Rule("COMFY005", "error", "alpha 0 is applied as scale 0 (sd-scripts: alpha = rank)",
             f"{COMFY} comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight (alpha / rank)", _comfy_alpha_zero),
        Rule("COMFY006", "error", "split_dims (numbered lora_down.<i>.weight) is skipped",
             f"{COMFY} comfy/weight_adapter/lora.py LoRAAdapter.load; comfy/lora.py load_lora", _comfy_split),
        Rule("COMFY007", "error", "modules_to_save and lora_B.bias tensors are skipped",
             f"{COMFY} comfy/lora.py load_lora (.diff, .diff_b, .set_weight only)", _comfy_full),
        Rule("COMFY008", "error", "PEFT DoRA magnitudes are skipped (only dora_scale is read)",
             f"{COMFY} comfy/lora.py load_lora (dora_scale)", _comfy_dora),
    ))


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (VLLM_RUNTIME, LCPP_RUNTIME, DIFF_RUNTIME, COMFY_RUNTIME)}


def names() -> list[str]:
    """Every runtime's name (the choices of `validate --for`)."""
    return list(RUNTIMES)


def _subject(path_or_adapter, options) -> Subject:
    if isinstance(path_or_adapter, Adapter):
        a = path_or_adapter
        return Subject(str(a.info.get("dialect", "loratool")), a)
    from ..io import peft, registry

    d = registry.detect(path_or_adapter)
    if d.name not in ("peft", "kohya"):  # only these are read by some runtime; the others need no structure
        return Subject(d.name, Adapter(targets={}))
    a = registry.structure(path_or_adapter, dialect=d, **options)
    cfg = {}
    if d.name == "peft":
        p = Path(path_or_adapter)
        cfg = peft.read_config((p if p.is_dir() else p.parent) / peft.CONFIG_NAME)
    return Subject(d.name, a, cfg)


def check_runtime(path_or_adapter, runtime: str, **options) -> list[Finding]:
    """What `runtime` refuses, or applies differently, in an adapter, from its structure alone (headers and
    configs; no tensor is read).

    Args:
        path_or_adapter: an adapter path of any dialect (file or PEFT folder), or an Adapter (its
            info["dialect"] names the dialect; without a config, config-only rules stay silent).
        runtime: one of `names()`: "vllm", "llama.cpp", "diffusers", "comfyui".
        options: passed to the dialect's structure reader (for example `base` for kohya names).
    Returns:
        Findings in rule order; empty when the runtime takes the adapter as it is. When the runtime does not
        read the dialect at all, the one finding says so and what to convert to.
    Raises:
        UnsupportedError: an unknown runtime.
        SpecError, FileError, UnsupportedError: as the dialect's structure reader says.
    """
    rt = RUNTIMES.get(runtime)
    if rt is None:
        raise UnsupportedError(f"\"{runtime}\" is not a runtime loratool checks; it checks {', '.join(names())}")
    s = _subject(path_or_adapter, options)
    if s.dialect not in rt.reads:
        r = rt.format_rule
        to = "a PEFT folder (loratool convert ADAPTER -o out/ --to peft)" if "peft" in rt.reads and \
            "kohya" not in rt.reads else "a kohya file (loratool convert ADAPTER -o out.safetensors --to kohya)"
        return [Finding(r.id, r.severity, f"{rt.title} does not read a {s.dialect} adapter; write {to} and check "
                                          "that", r.source)]
    out = []
    for r in rt.rules:
        hit = r.check(s)
        if hit is not None:
            out.append(Finding(r.id, r.severity, hit[0], r.source, tuple(hit[1])))
    return out


def rules() -> list[tuple[str, Rule]]:
    """(runtime name, rule) for every rule, format rules first: what docs/runtimes.md lists."""
    return [(rt.name, r) for rt in RUNTIMES.values() for r in (rt.format_rule, *rt.rules)]


__all__ = ["Finding", "Rule", "Runtime", "RUNTIMES", "check_runtime", "names", "rules"]
