"""What a model folder or model file is, from its headers and config.json alone: what `inspect` says of a base
model it is given in place of an adapter."""

from __future__ import annotations

import os

from collections import Counter
from pathlib import Path

from .. import spec
from ..container import read_json_file
from ..errors import LoraToolError, SpecError
from ..io.base import TORCH_SUFFIXES, SafetensorsBase, open_base

HINT = "this is a model, not an adapter; use it as BASE of merge, or as validate --base / convert --base"
ADAPTER_CONFIG = "adapter_config.json"  # io.peft.CONFIG_NAME; a folder with it is a PEFT adapter
WEIGHT_NAMES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")

# config.json fields shown, each from the first of its names that the config has (GPT-2 and T5 name them
# differently; a diffusers component names its class `_class_name`).
CONFIG_FIELDS = {
    "architecture": ("architectures", "_class_name"), "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model"), "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "intermediate_size": ("intermediate_size", "n_inner", "d_ff"),
    "num_attention_heads": ("num_attention_heads", "n_head"), "num_key_value_heads": ("num_key_value_heads",),
    "vocab_size": ("vocab_size",), "cross_attention_dim": ("cross_attention_dim",),
    "torch_dtype": ("torch_dtype", "dtype"),
}
EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "shared.weight")


def is_model_folder(path: Path) -> bool:
    """A folder without adapter_config.json that holds model weights (a Hugging Face or diffusers folder)."""
    if not path.is_dir() or os.path.lexists(path / ADAPTER_CONFIG):  # whatever it is, the adapter reader says
        return False
    return any((path / n).is_file() for n in WEIGHT_NAMES) or any(path.glob("*.safetensors"))


def _open(p: Path) -> list:
    """The base readers of a model path: open_base's, or each .safetensors file of a folder that has no index
    (a diffusers component folder: diffusion_pytorch_model.safetensors)."""
    if p.is_dir() and not any((p / n).is_file() for n in WEIGHT_NAMES):
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{p}: folder has no {ADAPTER_CONFIG} and no model weights; pass an adapter file or folder")
        opened = []
        try:
            for f in files:
                opened.append(SafetensorsBase(f))
        except BaseException:
            for b in opened:
                b.close()
            raise
        return opened
    return [open_base(p)]


def _config(p: Path, notes: list) -> dict | None:
    """config.json of the folder (or beside a model.safetensors or a shard the index lists), or None."""
    f = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not f.is_file():
        return None
    try:
        cfg = read_json_file(f, "config.json")
    except LoraToolError as e:
        notes.append(f"config.json not read: {e}")
        return None
    if not isinstance(cfg, dict):
        notes.append("config.json is not a JSON object")
        return None
    return cfg


def _shard_note(p: Path) -> tuple[bool, str | None]:
    """(the file belongs to the folder's model, a note when it is one shard of several)."""
    if p.is_dir() or p.name == "model.safetensors":
        return True, None
    index = p.parent / WEIGHT_NAMES[0]
    if not index.is_file():
        return False, None
    try:
        shards = sorted(set(read_json_file(index, WEIGHT_NAMES[0])["weight_map"].values()))
    except (LoraToolError, KeyError, TypeError, AttributeError):
        return False, None
    if p.name not in shards:
        return False, None
    return True, (f"one shard of {len(shards)} listed in {WEIGHT_NAMES[0]}; inspect the folder for the whole "
                  "model")


def _fields(cfg: dict) -> dict:
    out = {}
    for name, keys in CONFIG_FIELDS.items():
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                out[name] = v
                break
    return out


def _tied(cfg: dict | None, keys, whole: bool) -> dict | None:
    """Whether the output head shares the input embedding: config.json's tie_word_embeddings, else (for a whole
    model) an embedding without lm_head.weight."""
    from ..io.ties import config_tie

    said = config_tie(cfg)  # top level, or a multimodal model's text_config
    if said is not None:
        return {"tied": said, "from": "config.json tie_word_embeddings"}
    if not whole or not any(k.endswith(EMBEDDINGS) for k in keys):
        return None
    head = any(k.endswith("lm_head.weight") for k in keys)
    return {"tied": not head, "from": f"keys (lm_head.weight {'present' if head else 'absent'})"}


def describe_model(path) -> dict:
    """A summary of a model folder or model file, from headers and config.json (no tensor data; torch only for a
    torch file).

    Args:
        path: a Hugging Face or diffusers folder, a model .safetensors file, a shard, or a torch state dict.
    Returns:
        {"kind": "model", "path", "format", "files", "tensors", "parameters", "dtypes" (dtype -> tensors),
        "bytes" (of the tensors), "config" (CONFIG_FIELDS found in config.json, or None), "tied_embeddings"
        ({"tied", "from"} or None), "guess", "training", "notes", "hint"}.
    Raises:
        FileError, SpecError: as io.base.open_base (a missing shard, a broken header or index).
    """
    from ..guess import guess, training

    p = Path(path)
    notes: list[str] = []
    bases = _open(p)
    try:
        shapes, dtypes, meta = {}, Counter(), {}
        params = nbytes = 0
        for b in bases:
            for k in b.keys():
                shape, dt = b.info(k)
                n = 1
                for d in shape:
                    n *= int(d)
                shapes[k] = tuple(int(d) for d in shape)
                dtypes[dt] += 1
                params += n
                nbytes += n * spec.DTYPE_SIZES.get(dt, 0)
            for s in getattr(b, "shards", {b.path: b}).values():  # a sharded folder's metadata is its shards'
                meta.update(s.header.metadata if isinstance(s, SafetensorsBase) else {})
        files = sorted({str(f) for b in bases for f in b.files if not str(f).endswith(".json")})
        fmt = "torch" if all(f.endswith(TORCH_SUFFIXES) for f in files) else "safetensors"
    finally:
        for b in bases:
            b.close()
    whole, shard = _shard_note(p)
    if shard:
        notes.append(shard)
    cfg = _config(p, notes) if whole else None
    fields = _fields(cfg) if cfg else None
    declared = dict(meta)
    if cfg:
        declared.update({k: cfg[k] for k in ("model_type", "_name_or_path") if isinstance(cfg.get(k), str)})
        if isinstance(cfg.get("architectures"), list) and cfg["architectures"]:
            declared["architectures"] = str(cfg["architectures"][0])
    return {
        "kind": "model", "path": str(path), "format": fmt, "files": len(files), "tensors": len(shapes),
        "parameters": params, "dtypes": dict(sorted(dtypes.items())), "bytes": nbytes, "config": fields,
        "tied_embeddings": _tied(cfg, shapes, shard is None), "guess": guess(shapes, declared),
        "training": training(meta), "notes": notes, "hint": HINT,
    }


__all__ = ["describe_model", "is_model_folder", "HINT"]
