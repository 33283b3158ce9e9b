"""mlx-lm LoRA adapters: a folder with `adapters.safetensors` and `adapter_config.json`

    <module>.lora_a    (in, r)    the transpose of PEFT's lora_A
    <module>.lora_b    (r, out)   the transpose of PEFT's lora_B
    adapter_config.json: fine_tune_type "lora", num_layers, lora_parameters {rank, scale, dropout, keys?}

Math (mlx_lm/tuner/lora.py): LoRALinear.fuse adds ((scale * lora_b.T) @ lora_a.T), so with A = lora_a.T
(r, in) and B = lora_b.T (out, r), ΔW = scale · B A: a "linear" target on `<module>.weight` whose alpha is
scale · r (scale_rule "standard"). LoRAEmbedding.fuse adds scale · (lora_a @ lora_b) to the (num_embeddings,
dims) table, which is the "embedding" layout with the same A and B. The scale is stored, not alpha: one per
file. <module> is the module path in the mlx-lm model (`model.layers.0.self_attn.q_proj` for Llama), the
same as transformers'; with a base it resolves under a leading prefix.

Refused: DoRA (fine_tune_type "dora" or use_dora; its `.m` magnitudes), full fine-tuning, mixture-of-experts
LoRA (3-D factors of LoRASwitchLinear) and quantized LoRA factors (`lora_a_scales`).

The writer needs one rank (mlx-lm builds every LoRA layer from lora_parameters.rank) and writes one scale:
the most common; a target with another scale has it folded into its lora_b (computed in float64, rounded
once to the factor's dtype), never dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..adapter import Adapter, Block, Target
from ..container import escape, read_json_file, write_file
from ..errors import FileError, MismatchError, SpecError, UnsupportedError
from ._common import (Dialect, Source, as_source, base_keys, check_unknown, deferred, finite_number, header_only,
                      materialize, metas_of_header, positive_int, ref, require_dir_or_file, safetensors_reader)
from .native import _check_finite, numpy_tensors, tensors_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
NAME = re.compile(r"^(?P<m>.+)\.(?P<f>lora_a|lora_b)$", re.S)
REFUSED = (
    (re.compile(r"\.lora_[ab]_(scales|biases)$"), "is a quantized LoRA factor (QuantizedLoRALinear)"),
    (re.compile(r"\.m$"), "is a DoRA magnitude (DoRALinear)"),
)
LAYER = re.compile(r"^(?:.*\.)?layers\.\d+\.(?P<key>.+)$", re.S)


def _paths(path) -> tuple[Path, Path]:
    p = require_dir_or_file(path)
    folder = p if p.is_dir() else p.parent
    cfg, weights = folder / CONFIG_NAME, (p if p.is_file() else p / WEIGHTS_NAME)
    if not cfg.is_file():
        raise SpecError(f"{p}: no {CONFIG_NAME} in {folder}; mlx-lm keeps the LoRA scale there, and loratool never "
                        "guesses it")
    if not weights.is_file():
        raise FileError(f"{p}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return cfg, weights


def read_config(cfg_path) -> dict:
    """The mlx-lm adapter config, checked for what changes ΔW.

    Raises:
        SpecError: not a JSON object, lora_parameters missing, rank not a positive integer, scale not finite.
        UnsupportedError: DoRA or full fine-tuning.
    """
    cfg = read_json_file(cfg_path, "mlx-lm adapter_config.json")
    if not isinstance(cfg, dict):
        raise SpecError(f"{cfg_path}: top level is not a JSON object")
    kind = cfg.get("fine_tune_type", "dora" if cfg.get("use_dora") else "lora")
    if kind != "lora":
        why = {"dora": "DoRA rescales each output row by a learned magnitude; loratool reads plain LoRA only",
               "full": "a full fine-tune stores whole weights, not LoRA factors"}.get(kind, "not LoRA")
        raise UnsupportedError(f"{cfg_path}: fine_tune_type is {json.dumps(kind)}: {why}")
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        raise SpecError(f"{cfg_path}: \"lora_parameters\" is missing or not an object; mlx-lm keeps rank and scale "
                        "there")
    if not positive_int(lp.get("rank")):
        raise SpecError(f"{cfg_path}: lora_parameters.rank is {json.dumps(lp.get('rank'))}; it must be a positive "
                        "integer")
    if not finite_number(lp.get("scale")):
        raise SpecError(f"{cfg_path}: lora_parameters.scale is {json.dumps(lp.get('scale'))}; it must be a finite "
                        "number (mlx-lm's default is 20.0, but loratool never guesses it)")
    return cfg


def structure(path, *, base=None, allow_unknown: bool = False) -> Adapter:
    """The adapter of an mlx-lm folder (every factor None) from adapter_config.json and the safetensors header.

    Args and Raises: as `load`.
    """
    return header_only(_plan(path, base, allow_unknown, then=lambda adapter, read: adapter))


def load(path, *, base=None, allow_unknown: bool = False, lazy: bool = False) -> Adapter:
    """Read an mlx-lm LoRA adapter (folder, or its adapters.safetensors) with its tensors, as numpy arrays.

    Args:
        path: the folder or its adapters.safetensors (or a Source of either).
        base: base model (path or io.base.BaseModel): resolves keys, checks shapes, tells embeddings apart.
        allow_unknown: record keys that are not mlx-lm LoRA factors in info["unknown_keys"] instead of failing.
        lazy: return the structure with each target's factors read on demand (`Target.loaded`).
    Raises:
        SpecError, UnsupportedError, MismatchError, FileError: with the file, key and fix in the message.
    """
    return _plan(path, base, allow_unknown, then=deferred if lazy else materialize)


def _plan(path, base, allow_unknown, then):
    src = as_source(path)
    cfg_path, weights = _paths(src.path)
    cfg = read_config(cfg_path)
    hdr = src.checked_header(weights)
    with base_keys(base) as bk:
        adapter = _build(weights, cfg, metas_of_header(hdr), bk, allow_unknown)
        return then(adapter, safetensors_reader(weights, hdr))


def _build(where, cfg, metas, bk, allow_unknown) -> Adapter:
    lp = cfg["lora_parameters"]
    scale, rank = float(lp["scale"]), int(lp["rank"])
    modules: dict[str, dict] = {}
    unknown = []
    for name, x in metas.items():
        for pattern, why in REFUSED:
            if pattern.search(name):
                raise UnsupportedError(f"{where}: \"{escape(name)}\" {why}; loratool reads plain LoRA (lora_a/lora_b) "
                                       "only")
        m = NAME.match(name)
        if m is None:
            unknown.append(name)
            continue
        modules.setdefault(m["m"], {})[m["f"]] = x
    targets = {}
    for module, d in sorted(modules.items()):
        shown = escape(module)
        if set(d) != {"lora_a", "lora_b"}:
            raise SpecError(f"{where}: module \"{shown}\" has {next(iter(d))} without its pair")
        a, b = d["lora_a"], d["lora_b"]
        if not (a.is_float and b.is_float):
            raise SpecError(f"{where}: module \"{shown}\": factors are {a.dtype}/{b.dtype}, not floating point")
        if a.ndim == 3 or b.ndim == 3:
            raise UnsupportedError(f"{where}: module \"{shown}\" has 3-D factors: mixture-of-experts LoRA "
                                   "(LoRASwitchLinear), which loratool does not read yet")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise SpecError(f"{where}: module \"{shown}\": lora_a {list(a.shape)} and lora_b {list(b.shape)} are not "
                            "an mlx-lm pair ((in, r) and (r, out))")
        r, inp, out = int(a.shape[1]), int(a.shape[0]), int(b.shape[1])
        if r != rank:
            raise SpecError(f"{where}: module \"{shown}\" has rank {r} but lora_parameters.rank is {rank}; mlx-lm "
                            "would refuse to load it")
        layout, shape, key = "linear", (out, inp), module + ".weight"
        if bk is not None:
            key = bk.resolve_dotted(key, f"{where}: module \"{shown}\"")
            have = bk.shape(key)
            if have == (inp, out) and have != shape:
                layout, shape = "embedding", (inp, out)  # LoRAEmbedding: lora_a (num_embeddings, r)
            if have != shape:
                raise MismatchError(f"{where}: module \"{shown}\": factors imply weight {list(shape)} but base "
                                    f"\"{escape(key)}\" is {list(have)}")
        elif module.endswith(("embed_tokens", "wte", "word_embeddings")):
            layout, shape = "embedding", (inp, out)
        # Both layouts: the matrix view is (out, in) = (dims, num_embeddings) for an embedding.
        block = Block(rank=r, alpha=scale * r, scale_rule="standard", rows=(0, out), cols=(0, inp),
                      A=ref(a.name, lambda x: x.T), B=ref(b.name, lambda x: x.T))  # (r, in), (out, r): views
        targets[key] = Target(key=key, layout=layout, shape=shape, blocks=(block,), info={"mlx_module": module})
    info: dict = {"dialect": "mlx", "note": f"mlx-lm stores scale {scale:g}; alpha = scale * rank"}
    check_unknown(where, "mlx-lm", unknown, allow_unknown, info)
    meta = {"mlx.num_layers": str(cfg.get("num_layers", -1))}
    return Adapter(targets=targets, metadata=meta, info=info)


# ---- writer --------------------------------------------------------------------------------------------

def plan(adapter: Adapter) -> tuple[dict, dict, list]:
    """(adapter_config.json dict, name -> tensor, keys of the targets whose scale was folded into lora_b)
    expressing `adapter` as an mlx-lm LoRA adapter.

    Raises:
        UnsupportedError: a target mlx-lm cannot hold (full, transposed, conv, blocks).
    """
    import numpy as np

    adapter = adapter.as_numpy()
    lora = []
    for t in adapter:
        where = f"target \"{escape(t.key)}\""
        if t.kind == "full":
            raise UnsupportedError(f"{where} is a whole-tensor delta; mlx-lm adapters hold only lora_a/lora_b pairs, "
                                   "so the conversion cannot be exact")
        if t.layout not in ("linear", "embedding"):
            raise UnsupportedError(f"{where} is a {t.layout} weight; mlx-lm LoRA adapts Linear and Embedding layers "
                                   "only, so the conversion cannot be exact")
        if not t.is_whole:
            raise UnsupportedError(f"{where} has {len(t.blocks)} block(s) that are not one pair over the whole weight; "
                                   "mlx-lm holds one pair per module, so the conversion cannot be exact")
        if not t.key.endswith(".weight"):
            raise UnsupportedError(f"{where}: mlx-lm adapts modules, so a target key must end in \".weight\"")
        lora.append(t)
    if not lora:
        raise UnsupportedError("adapter has no LoRA targets; an mlx-lm adapter needs at least one")
    # mlx-lm builds every LoRA layer with one rank (lora_parameters.rank): a smaller pair is padded with zero
    # rows of A and zero columns of B to the largest rank, which leaves B @ A, and so ΔW, exactly as it was.
    rank = max(t.blocks[0].rank for t in lora)
    scale = Counter(t.blocks[0].scale for t in lora).most_common(1)[0][0]
    tensors, keys, folded = {}, set(), []
    for t in lora:
        b = t.blocks[0]
        module = t.key[: -len(".weight")]
        B = b.B
        if b.scale != scale:
            # One scale per file: fold this target's own into B (float64 product, rounded once), never drop it.
            B = (B.astype(np.float64) * (b.scale / scale)).astype(B.dtype)
            folded.append(t.key)
        A, pad = b.A, rank - b.rank
        if pad:
            A = np.concatenate([A, np.zeros((pad, A.shape[1]), A.dtype)])  # (rank, in)
            B = np.concatenate([B, np.zeros((B.shape[0], pad), B.dtype)], axis=1)  # (out, rank)
        tensors[module + ".lora_a"] = np.ascontiguousarray(A.T)  # (in, rank)
        tensors[module + ".lora_b"] = np.ascontiguousarray(B.T)  # (rank, out)
        m = LAYER.match(module)
        keys.add(m["key"] if m else module)
    cfg = {"fine_tune_type": "lora", "num_layers": -1,
           "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)}}
    return cfg, tensors, folded


def save(adapter: Adapter, path, *, overwrite: bool = False) -> int:
    """Write `adapter` as an mlx-lm adapter folder (adapters.safetensors + adapter_config.json), atomically.
    Returns the bytes written.

    Raises:
        SpecError: a factor was never loaded or is not floating point.
        UnsupportedError: the adapter cannot be expressed (the message says which target and why).
        NumericError: a factor is not finite.
    """
    from ..fsutil import atomic_dir

    numpy_tensors(tensors_of(adapter), path)
    adapter = adapter.as_numpy()
    _check_finite(adapter, tensors_of(adapter), str(path))
    cfg, tensors, _ = plan(adapter)
    meta = {k: v for k, v in adapter.metadata.items() if not k.startswith(("loratool.", "peft.", "mlx."))}
    meta["format"] = "mlx"  # what mlx.core.save_safetensors writes
    with atomic_dir(path, overwrite=overwrite) as tmp:
        n = write_file(tmp / WEIGHTS_NAME, tensors, meta)
        text = json.dumps(cfg, indent=4, allow_nan=False) + "\n"
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
    return n + len(text.encode("utf-8"))


def _config_is_mlx(cfg_path: Path) -> bool:
    try:
        text = cfg_path.read_text(encoding="utf-8", errors="replace")[:1 << 20]
    except OSError:
        return False
    return "lora_parameters" in text or "fine_tune_type" in text


def _detect(src: Source) -> int:
    p = src.path
    folder = p if p.is_dir() else p.parent
    if p.is_file() and p.suffix != ".safetensors":
        return 0
    if p.is_dir() and not (p / WEIGHTS_NAME).is_file():
        return 0
    # Above PEFT's folder (100): both keep an adapter_config.json; mlx-lm's names lora_parameters.
    return 110 if (folder / CONFIG_NAME).is_file() and _config_is_mlx(folder / CONFIG_NAME) else 0


DIALECT = Dialect(
    name="mlx", description="an mlx-lm LoRA folder (adapter_config.json + adapters.safetensors, lora_a/lora_b)",
    detect=_detect, structure=structure, load=load, options=frozenset({"base", "allow_unknown"}),
    reads=(".safetensors",), save=save, writes="folder", save_options=frozenset({"overwrite"}))

__all__ = ["load", "save", "structure", "plan", "read_config", "DIALECT"]
