"""GGUF LoRA adapters as llama.cpp reads them (`convert_lora_to_gguf.py`, `llama-adapter.cpp`), read and written
through gguf-py (GGUFReader, GGUFWriter, the tensor name map):

    general.type = "adapter", adapter.type = "lora", general.architecture = llama.cpp's arch (ARCHS)
    adapter.lora.alpha            one float for the file: scale = alpha / r (r = the tensor's rank), 1 when 0
    <gguf name>.weight.lora_a     numpy (r, in)    e.g. blk.0.attn_q.weight.lora_a
    <gguf name>.weight.lora_b     numpy (out, r)

llama.cpp's scale (llama-adapter.h): `alpha ? adapter_scale * alpha / rank : adapter_scale`. Names map to
transformers' through gguf's TensorNameMap (gguf.get_tensor_name_map(arch, n_blocks)). The architecture is the
base model's: convert_lora_to_gguf.py converts a LoRA with the model class convert_hf_to_gguf.py registers for
the base's config.json, and llama.cpp refuses an adapter whose general.architecture is not its model's. The
writer takes it from config.json's `model_type` (beside --base, or beside the adapter's base_model_name_or_path
when that is a local folder) or from the GGUF file it was read from; the reader from general.architecture.

Which architectures permute q/k (convert_hf_to_gguf.py): LlamaModel, registered for LlamaForCausalLM,
MistralForCausalLM and MixtralForCausalLM with model_arch LLAMA, permutes the rows of the q and k weights in
modify_tensors (LlamaModel.permute: n_head for q, n_head_kv for k), and so the rows of their lora_b; the reader
undoes it and the writer does it, with the head counts from the base's config.json (num_attention_heads,
num_key_value_heads), or from the `loratool.head_count` / `loratool.head_count_kv` keys this writer adds
(llama.cpp ignores keys it does not know). Qwen2Model (QWEN2), Qwen3Model (a Qwen2Model, QWEN3), GemmaModel
(GEMMA) and Gemma2Model (GEMMA2) are TextModels that map names only (Gemma adds 1 to norm weights, which no LoRA
pair targets): their factors are written as PEFT holds them.

One alpha per file: the writer writes the alpha every target shares (alpha_r = scale·r equal for all), else
alpha = rank when all ranks agree (scale 1) and each target's own scale folded into its lora_b (float64 product,
rounded once), never dropped.

Only the architectures of ARCHS and their attention and MLP Linear targets (q/k/v/o, gate/up/down): other
architectures, embeddings, whole-tensor deltas, blocks and quantized (Q8_0 ...) LoRA tensors are refused with
the reason.
"""

from __future__ import annotations

import functools

import json
import re
from pathlib import Path

from ..adapter import Adapter, Block, Target
from ..container import escape, read_json_file
from ..errors import FileError, MismatchError, SpecError, UnsupportedError
from ._common import (Dialect, Lazy, Source, as_source, base_keys, check_unknown, header_only, materialize,
                      require_dir_or_file)

# config.json model_type -> llama.cpp's architecture (gguf.MODEL_ARCH_NAMES), per the module docstring.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
         "gemma2": "gemma2"}
PERMUTES_QK = frozenset({"llama"})  # the architectures whose converter permutes q/k rows (LlamaModel)
MODULES = tuple("self_attn." + s for s in ("q_proj", "k_proj", "v_proj", "o_proj")) + \
    tuple("mlp." + s for s in ("gate_proj", "up_proj", "down_proj"))  # transformers names in every ARCHS model
NAME = re.compile(r"^(?P<g>.+)\.weight\.lora_(?P<f>a|b)$", re.S)
HEADS = ("loratool.head_count", "loratool.head_count_kv")
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _n_blocks(names) -> int:
    ns = [int(m.group(1)) for n in names for m in [re.match(r"^blk\.(\d+)\.", n)] if m]
    return max(ns) + 1 if ns else 1


@functools.lru_cache(maxsize=8)
def _name_map(n_blocks: int, arch: str = "llama"):
    """gguf's tensor name map of llama.cpp architecture `arch` with `n_blocks` blocks (built once: building it
    formats every name of every block, 15 ms for 32 blocks, which once per target made `inspect` of a 224-target
    file take 3 s)."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def hf_module(gguf_name: str, n_blocks: int, arch: str = "llama") -> str | None:
    """The transformers module path of a GGUF tensor name without ".weight", by gguf's map of `arch`."""
    tmap = _name_map(n_blocks, arch)
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    candidates = (["model.layers.{}." + s for s in MODULES] if m else ["model.embed_tokens", "lm_head"])
    for c in candidates:
        name = c.format(m.group(1)) if m else c
        if tmap.get_name(name) == gguf_name:
            return name
    return None


def _permute(w, n_head: int, n_head_kv: int | None):
    """convert_hf_to_gguf.py LlamaModel.permute on the rows of w (out, ...)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w, n_head: int, n_head_kv: int | None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_of(base) -> dict | None:
    """The config.json beside a base (a path, or an open base's path), or None."""
    if base is None or not isinstance(base, (str, Path)):
        base = getattr(base, "path", None)
        if base is None:
            return None
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    if not (folder / "config.json").is_file():
        return None
    cfg = read_json_file(folder / "config.json", "config.json")
    return cfg if isinstance(cfg, dict) else None


def arch_of_config(cfg: dict | None, where) -> str | None:
    """llama.cpp's architecture of a transformers config.json (its model_type), or None without a config.

    Raises:
        UnsupportedError: a model_type loratool does not write GGUF LoRA for.
    """
    if cfg is None:
        return None
    mt = cfg.get("model_type")
    if mt not in ARCHS:
        raise UnsupportedError(f"{where}: config.json model_type is {json.dumps(mt)}; loratool writes GGUF LoRA for "
                               f"{', '.join(sorted(ARCHS))} only (llama.cpp's tensor names and q/k permutation differ "
                               "by architecture)")
    return ARCHS[mt]


def _heads_of_base(base) -> tuple[int, int] | None:
    """(num_attention_heads, num_key_value_heads) from the config.json beside a base, or None."""
    cfg = _config_of(base)
    n = cfg.get("num_attention_heads") if isinstance(cfg, dict) else None
    if not isinstance(n, int):
        return None
    kv = cfg.get("num_key_value_heads", n)
    return n, kv if isinstance(kv, int) else n


def _open(path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except OSError as e:
        raise FileError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError ... for malformed files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SpecError(f"{path}: not a readable GGUF file ({escape(first)})") from None


def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:
        return None


def structure(path, *, base=None, allow_unknown: bool = False) -> Adapter:
    """The adapter of a GGUF LoRA file (every factor None) from its header (GGUFReader memory-maps the file and
    reads no tensor data). Args and Raises: as `load`."""
    return header_only(_plan(path, base, allow_unknown, then=lambda adapter: adapter))


def load(path, *, base=None, allow_unknown: bool = False, lazy: bool = False) -> Adapter:
    """Read a llama.cpp GGUF LoRA adapter with its tensors, as numpy arrays (copied out of the memory map).

    Args:
        path: the .gguf file (or a Source of it).
        base: base model (path or io.base.BaseModel): resolves keys, checks shapes, and (its config.json) gives
            the head counts that undo the q/k row permutation.
        allow_unknown: record tensors that are not LoRA factors in info["unknown_keys"] instead of failing.
        lazy: accepted for the registry (merge asks every dialect for it); the factors are copied out of the
            memory map here either way.
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, tensor and fix in the message.
    """
    return _plan(path, base, allow_unknown, then=lambda adapter: materialize(adapter, lambda names: {}))


def _plan(path, base, allow_unknown, then):
    import numpy as np

    src = as_source(path)
    p = require_dir_or_file(src.path)
    reader = _open(p)
    gtype, atype, arch = _field(reader, "general.type"), _field(reader, "adapter.type"), \
        _field(reader, "general.architecture")
    if gtype != "adapter":
        raise SpecError(f"{p}: general.type is {json.dumps(gtype)}, not \"adapter\": a GGUF model, not a LoRA adapter; "
                        "pass the adapter file")
    if atype != "lora":
        raise UnsupportedError(f"{p}: adapter.type is {json.dumps(atype)}; loratool reads GGUF LoRA adapters only")
    if arch not in set(ARCHS.values()):
        raise UnsupportedError(f"{p}: general.architecture is {json.dumps(arch)}; loratool reads GGUF LoRA for "
                               f"{', '.join(sorted(set(ARCHS.values())))} only (tensor names and the q/k permutation "
                               "differ by architecture)")
    alpha = _field(reader, "adapter.lora.alpha")
    if alpha is None:
        alpha = 0.0
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise SpecError(f"{p}: adapter.lora.alpha is {alpha!r}; it must be a finite number")
    tensors = {t.name: t for t in reader.tensors}
    n_blocks = _n_blocks(tensors)
    heads = None
    if all(_field(reader, k) is not None for k in HEADS):
        heads = tuple(int(_field(reader, k)) for k in HEADS)
    pairs: dict[str, dict] = {}
    unknown = []
    for name, t in tensors.items():
        m = NAME.match(name)
        if m is None:
            unknown.append(name)
            continue
        pairs.setdefault(m["g"], {})[m["f"]] = t
    info: dict = {"dialect": "gguf", "note": f"adapter.lora.alpha {float(alpha):g} for every tensor (llama.cpp)",
                  "gguf_arch": arch}
    targets = {}
    with base_keys(base) as bk:
        if heads is None:
            heads = _heads_of_base(base)
        if heads is not None:
            info["gguf_heads"] = list(heads)  # so that writing GGUF again permutes q/k the same way
        for g, d in sorted(pairs.items()):
            t = _target(p, g, d, float(alpha), n_blocks, heads, bk, arch)
            targets[t.key] = t
    check_unknown(p, "GGUF", unknown, allow_unknown, info)
    return then(Adapter(targets=targets, metadata={}, info=info))


def _array(p, t):
    import numpy as np

    kind = t.tensor_type.name
    if kind not in DTYPES:
        raise UnsupportedError(f"{p}: \"{escape(t.name)}\" is {kind}; loratool reads F32, F16 and BF16 GGUF LoRA "
                               "tensors (convert the adapter with --outtype f32/f16/bf16)")
    data = np.array(t.data)  # a copy out of the memory map
    if kind == "BF16":
        import ml_dtypes

        data = data.view(ml_dtypes.bfloat16)
    return data.reshape(tuple(int(x) for x in reversed(t.shape)))


def _target(p, g, d, alpha, n_blocks, heads, bk, arch) -> Target:
    shown = escape(g)
    if set(d) != {"a", "b"}:
        raise SpecError(f"{p}: \"{shown}.weight\" has lora_{next(iter(d))} without its pair")
    a, b = d["a"], d["b"]
    sa, sb = tuple(int(x) for x in reversed(a.shape)), tuple(int(x) for x in reversed(b.shape))  # numpy order
    if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
        raise SpecError(f"{p}: \"{shown}.weight\": lora_a {list(sa)} and lora_b {list(sb)} are not a pair ((r, in), "
                        "(out, r))")
    for x in (a, b):
        if x.tensor_type.name not in DTYPES:
            raise UnsupportedError(f"{p}: \"{escape(x.name)}\" is {x.tensor_type.name}; loratool reads F32, F16 and BF16 "
                                   "GGUF LoRA tensors (convert the adapter with --outtype f32/f16/bf16)")
    r, inp, out = sa[0], sa[1], sb[0]
    if g == "token_embd":
        raise UnsupportedError(f"{p}: \"{shown}\" is a LoRA on the token embedding, which loratool does not read from "
                               "GGUF yet")
    module = hf_module(g, n_blocks, arch)
    if module is None:
        raise SpecError(f"{p}: \"{shown}\" is not a {arch} attention or MLP tensor name in gguf's TensorNameMap")
    key = module + ".weight"
    if bk is not None:
        key = bk.resolve_dotted(key, f"{p}: \"{shown}\"")
        if bk.shape(key) != (out, inp):
            raise MismatchError(f"{p}: \"{shown}\": factors imply weight {[out, inp]} but base \"{escape(key)}\" is "
                                f"{list(bk.shape(key))}")
    kind = None if arch not in PERMUTES_QK else "q" if g.endswith(".attn_q") else "k" if g.endswith(".attn_k") else None
    if kind is not None and heads is None:
        raise MismatchError(f"{p}: \"{shown}\": llama.cpp permutes the rows of q/k LoRA factors by head; pass --base "
                            "the Hugging Face model folder (its config.json gives the head counts)")
    tinfo = {"gguf_name": g + ".weight"}

    def make_b(arrays, b=b, kind=kind):
        B = _array(p, b)
        if kind is None:
            return B
        return _unpermute(B, heads[0], heads[0] if kind == "q" else heads[1])

    scale_alpha = alpha if alpha else float(r)  # alpha 0: scale 1
    block = Block(rank=r, alpha=scale_alpha, scale_rule="standard", rows=(0, out), cols=(0, inp),
                  A=Lazy((), lambda arrays, a=a: _array(p, a)), B=Lazy((), make_b))
    return Target(key=key, layout="linear", shape=(out, inp), blocks=(block,), info=tinfo)


# ---- writer --------------------------------------------------------------------------------------------

def save(adapter: Adapter, path, *, overwrite: bool = True, heads: tuple[int, int] | None = None,
         base_model_name_or_path=None, arch: str | None = None) -> int:
    """Write `adapter` as a llama.cpp GGUF LoRA adapter of its base's architecture, atomically. Returns the
    bytes written.

    Args:
        heads: (num_attention_heads, num_key_value_heads) for the q/k row permutation (architecture llama);
            default: the head counts the adapter was read with (info), else those of the config.json beside
            `base_model_name_or_path` (convert's --base); required when a llama adapter adapts q_proj or k_proj.
        arch: llama.cpp's architecture ("llama", "qwen2", ...; ARCHS) or a transformers model_type; default:
            from the config.json beside `base_model_name_or_path`, else the architecture the adapter was read
            with (a GGUF file), else the config.json beside the adapter's own base_model_name_or_path.
    Raises:
        UnsupportedError: a target GGUF LoRA cannot hold (not Linear, blocks, a name gguf's map does not know),
            or an architecture loratool does not write.
        MismatchError: the architecture is unknown (no config.json), or llama q/k targets without head counts.
        SpecError, NumericError: a factor not loaded, not floating point or not finite.
    """
    import gguf
    import numpy as np

    from ..fsutil import atomic_file
    from .native import _check_finite, numpy_tensors, tensors_of

    numpy_tensors(tensors_of(adapter), path)
    adapter = adapter.as_numpy()
    _check_finite(adapter, tensors_of(adapter), str(path))
    heads = heads or adapter.info.get("gguf_heads") or _heads_of_base(base_model_name_or_path)
    arch = _arch_for(adapter, path, arch, base_model_name_or_path)
    n_blocks = 1 + max([int(m.group(1)) for t in adapter for m in [re.search(r"layers\.(\d+)\.", t.key)] if m] or [0])
    tmap = _name_map(n_blocks, arch)
    lora = []
    for t in adapter:
        where = f"target \"{escape(t.key)}\""
        if t.kind == "full" or t.layout != "linear" or not t.is_whole:
            raise UnsupportedError(f"{where} is not one LoRA pair on a Linear weight; llama.cpp GGUF adapters hold only "
                                   "those, so the conversion cannot be exact")
        module = re.sub(r"^.*?(model\.layers\.|model\.embed_tokens|lm_head)", r"\1", t.key.removesuffix(".weight"))
        name = tmap.get_name(module)
        if name is None or hf_module(name, n_blocks, arch) != module:  # gate_up_proj also maps to ffn_up
            raise UnsupportedError(f"{where} has no {arch} attention or MLP tensor name in gguf's TensorNameMap; "
                                   "llama.cpp GGUF adapters hold q/k/v/o and gate/up/down LoRA only")
        lora.append((t, name))
    if not lora:
        raise UnsupportedError("adapter has no LoRA targets; a GGUF LoRA adapter needs at least one")
    alphas = {t.blocks[0].scale * t.blocks[0].rank for t, _ in lora}
    ranks = {t.blocks[0].rank for t, _ in lora}
    alpha = next(iter(alphas))
    if len(alphas) != 1 or float(np.float32(alpha)) != alpha:
        # One alpha cannot express these scales: alpha = rank (scale 1), or 0 (llama.cpp: scale 1) for mixed
        # ranks, and each target's scale folded into its lora_b.
        alpha = float(next(iter(ranks))) if len(ranks) == 1 else 0.0
    writer_tensors = {}
    for t, name in lora:
        b = t.blocks[0]
        file_scale = alpha / b.rank if alpha else 1.0
        B = b.B if b.scale == file_scale else (b.B.astype(np.float64) * (b.scale / file_scale)).astype(b.B.dtype)
        if arch in PERMUTES_QK and name.endswith((".attn_q", ".attn_k")):
            if not heads:
                raise MismatchError(f"target \"{escape(t.key)}\": llama.cpp permutes q/k rows by head; pass --base the "
                                    "Hugging Face model folder (its config.json gives the head counts)")
            B = _permute(B, heads[0], heads[0] if name.endswith(".attn_q") else heads[1])
        writer_tensors[name + ".weight.lora_a"] = np.ascontiguousarray(b.A)
        writer_tensors[name + ".weight.lora_b"] = np.ascontiguousarray(B)
    # GGUFWriter writes to a path: a scratch file beside the output, copied into the atomic output.
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".gguf-") as scratch:
        w = gguf.GGUFWriter(Path(scratch) / "lora.gguf", arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        if heads and arch in PERMUTES_QK:
            w.add_uint32(HEADS[0], int(heads[0]))
            w.add_uint32(HEADS[1], int(heads[1]))
        for n, x in sorted(writer_tensors.items()):
            if x.dtype.name == "bfloat16":
                w.add_tensor(n, x.view(np.uint16), raw_shape=x.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
            elif x.dtype.name in ("float32", "float16"):
                w.add_tensor(n, x)
            else:
                w.add_tensor(n, x.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(Path(scratch) / "lora.gguf", "rb") as src, atomic_file(path, overwrite=overwrite) as out:
            shutil.copyfileobj(src, out)
    return Path(path).stat().st_size


def _arch_for(adapter: Adapter, path, arch, base_model_name_or_path) -> str:
    """The architecture `save` writes (its docstring gives the order of the sources).

    Raises:
        UnsupportedError: an architecture loratool does not write. MismatchError: none is known.
    """
    if arch is not None:
        if arch in ARCHS.values():
            return arch
        return arch_of_config({"model_type": arch}, path)
    got = arch_of_config(_config_of(base_model_name_or_path), path)
    if got is None:
        got = adapter.info.get("gguf_arch")
    if got is None:
        local = adapter.metadata.get("peft.base_model_name_or_path")
        got = arch_of_config(_config_of(local), path) if local and Path(local).is_dir() else None
    if got is None:
        raise MismatchError(f"{path}: llama.cpp needs the base model's architecture (general.architecture), which "
                            "differs by model and changes the tensor names and the q/k permutation; pass --base the "
                            "Hugging Face model folder (its config.json gives model_type)")
    return got


def _detect(src: Source) -> int:
    p = src.path
    if p.suffix != ".gguf" or not p.is_file():
        return 0
    try:
        with open(p, "rb") as f:
            return 100 if f.read(4) == b"GGUF" else 0
    except OSError:
        return 0


DIALECT = Dialect(
    name="gguf", description="a llama.cpp GGUF LoRA adapter (general.type adapter, blk.N.*.weight.lora_a/lora_b)",
    detect=_detect, structure=structure, load=load, options=frozenset({"base", "allow_unknown"}),
    reads=(".gguf",), save=save, writes="file", suffix=".gguf",
    save_options=frozenset({"overwrite", "heads", "base_model_name_or_path", "arch"}))

__all__ = ["load", "save", "structure", "hf_module", "arch_of_config", "ARCHS", "DIALECT"]
