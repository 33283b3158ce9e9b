"""Constants that mirror spec/FORMAT.md: format marker, version, metadata keys, names and rule ids.

This module imports nothing heavy (no torch, no numpy): `inspect` and `--help` read it on every call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORMAT_MARKER = "loratool.adapter"
SPEC_VERSION = (1, 1)
SPEC_VERSION_STR = f"{SPEC_VERSION[0]}.{SPEC_VERSION[1]}"

# __metadata__ keys owned by the spec (rule M001-M004). Every other key is opaque user metadata.
KEY_FORMAT = "loratool.format"
KEY_VERSION = "loratool.spec_version"
KEY_TARGETS = "loratool.targets"
KEY_INFO = "loratool.info"
RESERVED_PREFIX = "loratool."
KNOWN_KEYS = (KEY_FORMAT, KEY_VERSION, KEY_TARGETS, KEY_INFO)

# safetensors container limits (rule C002): the reference implementation refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000

# dtype name -> bytes per element. Factor dtypes (rule C007) are the float ones below.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # base tensors that can take a delta (rule B003)
# Rule B003 for an integer or float8 tensor that no quantized scheme (ops/quant.py) reads.
QUANTIZED_REFUSAL = ("a quantized or integer tensor in a layout loratool does not read (it merges into floating-point "
                     "tensors and into the weights of bitsandbytes nf4/fp4/int8, GPTQ, AWQ, MXFP4 and scaled FP8 "
                     "bases, with their companion tensors); dequantize the base with its own library first")
# Rule B003 for a fused float8 expert tensor (E, out, in) with per-expert scales (E, out/128, in/128): the FP8
# schemes (ops/fp8.py) cut a 2-D weight's rows into scale blocks and do not read per-expert scales.
FUSED_FP8_REFUSAL = ("a fused float8 expert tensor, whose per-expert scales loratool does not read (it dequantizes "
                     "and requantizes float8 weights stored as 2-D matrices only); dequantize the base with its own "
                     "library first (transformers: dequantize=True in its FineGrainedFP8Config)")


def quantized_refusal(dtype: str, shape) -> str:
    """Rule B003's reason for a base tensor of `dtype` and `shape` that no quantized scheme reads."""
    return FUSED_FP8_REFUSAL if dtype.startswith("F8_") and len(tuple(shape)) == 3 else QUANTIZED_REFUSAL


FACTOR_DTYPES = FLOAT_DTYPES

LAYOUTS = ("linear", "fan_in_fan_out", "embedding", "conv", "experts", "experts_t")
SCALE_RULES = ("standard", "rslora")
KINDS = ("lora", "full", "dora", "loha", "lokr", "tucker")
# Spec 1.1: DoRA, the LyCORIS kinds (LoHa, LoKr, LoCon with a Tucker core) and the fused-expert layouts. A 1.0
# reader refuses each of them (rules M005, T001) rather than misread it, so they are a minor version (section 7);
# a writer marks a file 1.1 only when it uses one, so plain LoRA files stay readable by 1.0 readers.
FACTORED_KINDS = ("loha", "lokr", "tucker")
KIND_FACTORS = {"loha": ("w1a", "w1b", "w2a", "w2b", "t1", "t2"),
                "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"),
                "tucker": ("up", "mid", "down")}
DORA_AXES = ("out", "in")
SINCE = {"dora": (1, 1), "loha": (1, 1), "lokr": (1, 1), "tucker": (1, 1), "experts": (1, 1), "experts_t": (1, 1)}


def version_needed(kinds_and_layouts) -> tuple[int, int]:
    """The lowest spec version that defines every kind and layout given (rule W006): 1.0 for lora and full
    targets on the four 1.0 layouts, 1.1 with any of SINCE."""
    return max([(1, 0)] + [SINCE[x] for x in kinds_and_layouts if x in SINCE])


# Tensor naming grammar (spec section 3). The target key is everything before the last suffix, so a
# base key may itself contain ".lora." without ambiguity (the suffixes are disjoint: at most one matches).
FACTOR_NAME = re.compile(r"^(?P<target>.+)\.lora\.(?P<block>0|[1-9][0-9]{0,5})\.(?P<factor>A|B)$", re.S)
DELTA_NAME = re.compile(r"^(?P<target>.+)\.delta$", re.S)
KIND_FACTOR_NAME = re.compile(
    r"^(?P<target>.+)\.(?:(?P<kind>loha)\.(?P<hfactor>w[12][ab]|t[12])|(?P<kkind>lokr)\.(?P<kfactor>w[12][ab]?|t2)"
    r"|(?P<tkind>tucker)\.(?P<tfactor>up|mid|down))$", re.S)
MAGNITUDE_NAME = re.compile(r"^(?P<target>.+)\.magnitude$", re.S)


def parse_kind_factor(name: str) -> tuple[str, str, str] | None:
    """(target, kind, factor) of a LyCORIS factor's tensor name `<target>.<kind>.<factor>`, or None."""
    m = KIND_FACTOR_NAME.match(name)
    if m is None:
        return None
    kind = m.group("kind") or m.group("kkind") or m.group("tkind")
    return m.group("target"), kind, m.group("hfactor") or m.group("kfactor") or m.group("tfactor")


def factor_name(target: str, block: int, factor: str) -> str:
    """Tensor name of factor "A" or "B" of block `block` of `target` (spec section 3)."""
    return f"{target}.lora.{block}.{factor}"


def delta_name(target: str) -> str:
    """Tensor name of the whole-tensor delta of a `full` target (spec section 3)."""
    return f"{target}.delta"


def kind_factor_name(target: str, kind: str, factor: str) -> str:
    """Tensor name of factor `factor` of a LyCORIS-kind target (loha, lokr, tucker; spec section 3)."""
    return f"{target}.{kind}.{factor}"


def magnitude_name(target: str) -> str:
    """Tensor name of the DoRA magnitude of a target (spec section 3)."""
    return f"{target}.magnitude"


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # "error" or "warning"
    summary: str


_RULES = [
    # Container: the safetensors file itself.
    Rule("C001", "error", "file is at least 8 bytes and its header length fits inside the file"),
    Rule("C002", "error", "header length is at most 100,000,000 bytes"),
    Rule("C003", "error", "header is UTF-8 JSON whose top level is an object"),
    Rule("C004", "error", "header starts with '{' and is padded only by trailing spaces"),
    Rule("C005", "error", "no key appears twice in any JSON object of the header"),
    Rule("C006", "error", "each tensor entry has exactly dtype (string), shape (list of ints >= 0) and data_offsets (2 ints)"),
    Rule("C007", "error", "factor and delta tensors are F16, BF16, F32 or F64"),
    Rule("C008", "error", "data_offsets span exactly the bytes of dtype x shape"),
    Rule("C009", "error", "tensor byte ranges are disjoint, leave no gap, and cover the data section to end of file"),
    Rule("C010", "error", "no tensor has zero elements"),
    Rule("C011", "error", "__metadata__ is an object whose values are strings"),
    Rule("C012", "error", "tensor names are non-empty printable text with no surrounding whitespace"),
    # Metadata.
    Rule("M001", "error", "__metadata__ has loratool.format = \"loratool.adapter\""),
    Rule("M002", "error", "loratool.spec_version is MAJOR.MINOR with a major version this reader knows (1)"),
    Rule("M003", "error", "loratool.targets is a JSON object (no NaN/Infinity, no duplicate keys) of target entries"),
    Rule("M004", "error", "each target entry has the required fields with the right types"),
    Rule("M005", "error", "kind, layout and scale_rule take one of their defined values"),
    Rule("M006", "error", "alpha is present and a finite number (never defaulted)"),
    Rule("M007", "error", "rank is a positive integer"),
    Rule("M008", "error", "block rows/cols are [start, stop) ranges with 0 <= start < stop <= the matrix view's size"),
    Rule("M009", "error", "shape fits the layout (2 dims for linear, fan_in_fan_out and embedding; 3 or more for conv; "
                          "3 for experts and experts_t)"),
    Rule("M010", "error", "a full target has no blocks and a finite scale; a lora or dora target has at least one block"),
    Rule("M011", "error", "base fingerprint fields are well formed (dtype a safetensors dtype, sha256 64 hex digits)"),
    # Tensors against the metadata.
    Rule("T001", "error", "every tensor name follows the naming grammar"),
    Rule("T002", "error", "every tensor belongs to a target (and block) declared in loratool.targets, of its kind"),
    Rule("T003", "error", "every declared block has both factors; every full target has its delta"),
    Rule("T004", "error", "A has shape (rank, cols) and B has shape (rows, rank)"),
    Rule("T005", "error", "a full delta has the target's shape"),
    Rule("T006", "error", "factor, delta and magnitude values are finite"),
    # DoRA (spec 1.1).
    Rule("D001", "error", "a DoRA target has dora_axis (\"out\" or \"in\") and dora_eps (a finite number >= 0): "
                          "a dora target always, a LyCORIS target both or neither"),
    Rule("D002", "error", "a DoRA target has its magnitude, 1-D, one value per row of the matrix view (axis out) or "
                          "per input channel (axis in)"),
    Rule("D003", "error", "the DoRA axis fits the layout: out on linear, fan_in_fan_out, embedding, conv; in on "
                          "linear and conv"),
    # LyCORIS kinds: LoHa, LoKr, LoCon with a Tucker core (spec 1.1).
    Rule("Y001", "error", "a loha, lokr or tucker target has layout linear or conv, a finite scale, and no blocks"),
    Rule("Y002", "error", "the target's factor tensors are exactly one of its kind's factor sets"),
    Rule("Y003", "error", "the factors' shapes fit together (one rank) and their product has the target's shape"),
    # Base compatibility (validate --base, merge).
    Rule("B001", "error", "every target exists in the base"),
    Rule("B002", "error", "every target's shape equals the base tensor's shape"),
    Rule("B003", "error", "the base tensor is floating point, or a quantized weight of a scheme loratool reads "
                          "dequantized (other integer and quantized tensors cannot be merged)"),
    Rule("B004", "error", "the base tensor matches the target's sha256 fingerprint when one is recorded"),
    # Warnings: legal but suspicious.
    Rule("W001", "warning", "unknown field or loratool.* metadata key (ignored by this reader)"),
    Rule("W002", "warning", "spec minor version is newer than this reader's"),
    Rule("W003", "warning", "a factor is all zeros, so the block's delta is zero"),
    Rule("W004", "warning", "A and B of a block have different dtypes"),
    Rule("W005", "warning", "the base tensor's dtype differs from the target's recorded dtype"),
    Rule("W006", "warning", "the file uses a kind or layout of a newer minor version than the one it declares "
                            "(readers of that version refuse it)"),
]

RULES = {r.id: r for r in _RULES}

# Not rules of this format: what `loratool validate` checks on the other dialects it reads (P: PEFT folders,
# K: kohya/sd-scripts files, L: loralib state dicts) and, with a base, on the fit of any adapter to it (F). The
# readers attach these ids to their refusals (io/), so a refusal and a finding are one check. README.md, section
# `loratool validate`, lists them.
_VALIDATE_RULES = [
    Rule("P001", "error", "the folder has adapter_config.json (a JSON object) and adapter_model.safetensors or .bin"),
    Rule("P002", "error", "peft_type is LORA and no variant loratool cannot hold exactly is set"),
    Rule("P003", "error", "r is present and a positive integer"),
    Rule("P004", "error", "lora_alpha is present and a finite number"),
    Rule("P005", "error", "target_modules is present: a list of module names or a regular expression"),
    Rule("P006", "error", "rank_pattern and alpha_pattern map regular expressions to a positive rank / finite alpha"),
    Rule("P007", "error", "every rank_pattern and alpha_pattern key matches a module of the adapter"),
    Rule("P008", "error", "use_rslora, fan_in_fan_out, lora_bias and use_dora are true or false"),
    Rule("P009", "warning", "use_dora: W' = m/‖W + sBA‖·(W + sBA) is not W + low rank; loratool holds each module "
                            "as a DoRA target and merges it exactly, refuses unmerge, rescale and combine, and writes "
                            "it to PEFT only (LyCORIS's dora_scale adds an eps to the norm)"),
    Rule("P010", "error", "every tensor is base_model.model.<module>.<LoRA factor> or a saved whole tensor"),
    Rule("P011", "error", "every module has both factors (lora_A and lora_B, or lora_embedding_A and _B), not a mix"),
    Rule("P012", "error", "factors are floating point and form a pair: 2-D, or conv with a 1x1 lora_B, equal ranks"),
    Rule("P013", "error", "the factors' rank equals r after rank_pattern"),
    Rule("P014", "error", "lora_B.bias, lora_magnitude_vector and saved whole tensors fit their module"),
    Rule("K001", "error", "every tensor is <name>.lora_down[.<i>].weight, <name>.lora_up[.<i>].weight, <name>.alpha "
                          "or a LyCORIS LoCon/LoHa/LoKr/DoRA tensor"),
    Rule("K002", "error", "no tensors of networks that only share kohya's names (OFT, GLoRA, LyCORIS full or norm "
                          "deltas)"),
    Rule("K003", "error", "every lora_down has its lora_up and every lora_up its lora_down"),
    Rule("K004", "warning", "every module has a non-zero alpha (missing or 0 means alpha = rank, scale 1)"),
    Rule("K005", "error", "alpha is one finite number"),
    Rule("K006", "error", "factors are floating point and form a pair: 2-D, or conv with a 4-D lora_down and a 1x1 "
                          "lora_up, equal ranks"),
    Rule("K007", "error", "split_dims pairs are numbered 0..n-1, not mixed with an unnumbered pair, with equal "
                          "2-D lora_down shapes"),
    Rule("K008", "error", "LyCORIS modules (LoHa hada_*, LoKr lokr_*, LoCon lora_mid, dora_scale) have every factor, "
                          "floating point, with shapes that fit together (one rank per module)"),
    Rule("L001", "error", "lora_alpha is given (loralib keeps it in code, not in the file)"),
    Rule("L002", "error", "the file is a weights-only state dict holding <module>.lora_A / <module>.lora_B tensors"),
    Rule("L003", "error", "every module has lora_A and lora_B, 2-D floating-point matrices"),
    Rule("L004", "error", "MergedLinear factors fit enable_lora (given when ranks differ, rows divide into the groups)"),
    Rule("L005", "error", "the factors fit the module's weight (transposed when fan_in_fan_out is set)"),
    Rule("L006", "error", "the factors' rank equals r when r is given"),
    Rule("L007", "warning", "each module's weight shape is known (in the file or from the base), not guessed"),
    Rule("L008", "error", "every key is a LoRA factor or its module's own weight or bias"),
    Rule("F001", "error", "the adapter changes the base: some target fits it, and not every delta that fits is zero"),
    Rule("F002", "error", "adapter names and base keys correspond one to one (no name fits several keys, no two "
                          "names one key)"),
    Rule("F003", "warning", "a target on a tied tensor (tie_word_embeddings): merged into the one tensor, it changes "
                          "the other side too"),
]
VALIDATE_RULES = {r.id: r for r in _VALIDATE_RULES}


def rule(rule_id: str) -> Rule:
    """The Rule of an id, of this format (RULES) or of validate's other checks (VALIDATE_RULES)."""
    return RULES.get(rule_id) or VALIDATE_RULES[rule_id]
