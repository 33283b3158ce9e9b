"""Tied weights of a base model: an output head (`lm_head.weight`) that is the input embedding's tensor.

transformers ties the head to the token embedding when the config's `tie_word_embeddings` is true: a
safetensors file then stores the embedding alone (`save_pretrained` drops `lm_head.weight`), and loading puts
the embedding's tensor in both places. A torch state dict keeps both keys on one storage. PEFT wraps the two
modules separately, so an adapter on one side changes that side only while it runs unmerged; merging it into
the one tensor moves both sides (ops/ties.py: what merge and extract do about it).

A tie is found from, in order:
  config.json   `tie_word_embeddings` (top level, or a multimodal model's `text_config`): true or false decides.
                Absent, transformers' default applies (true for many model types), which cannot be told without
                transformers; the weights decide: tied when the file lacks the head (a model with an untied
                head stores it).
  storage       a torch state dict whose two keys share one storage (same offset, shape and stride).
  adapters      no config.json at all: tied when an adapter targets a head the file lacks but whose shape is
                the embedding's (`find_ties(..., wanted=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .base import BaseModel

# Module names of token embeddings that transformers ties to the head (position embeddings never are).
TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
HEAD = "lm_head.weight"
CONFIG_KEY = "tie_word_embeddings"


@dataclass(frozen=True)
class Tie:
    """The head `head` is the tensor `embed` of the base.

    Attributes:
        embed: the stored key (the token embedding, or for a torch file the first of the keys on one storage).
        head: the other key; stored or not (`head_stored`).
        how: why it is a tie, for messages: "config.json", "config.json (default)", "shared storage" or
            "adapter targets the missing head".
    """

    embed: str
    head: str
    head_stored: bool
    how: str


def _config(path: Path):
    from ..container import read_json_file
    from ..errors import LoraToolError

    folder = path if path.is_dir() else path.parent
    try:
        cfg = read_json_file(folder / "config.json", "config.json")
    except LoraToolError:
        return None
    return cfg if isinstance(cfg, dict) else None


def config_tie(cfg: dict | None):
    """`tie_word_embeddings` of a config (True, False), or None when it does not say."""
    if cfg is None:
        return None
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict) and isinstance(c.get(CONFIG_KEY), bool):
            return c[CONFIG_KEY]
    return None


def _embedding(keys, info) -> str | None:
    """The token embedding's key: the 2-D tensor named like one, the shortest key when several are."""
    found = [k for k in keys if k.rsplit(".", 2)[-2:-1] and k.rsplit(".", 2)[-2] in TOKEN_EMBEDDINGS
             and k.endswith(".weight") and len(info(k)[0]) == 2]
    return min(found, key=lambda k: (k.count("."), k)) if found else None


def _head_key(keys) -> str:
    heads = [k for k in keys if k == HEAD or k.endswith("." + HEAD)]
    return heads[0] if len(heads) == 1 else HEAD


def find_ties(reader, path, wanted: Iterable[str] = ()) -> list[Tie]:
    """The tied tensors of a base model.

    Args:
        reader: an io.base reader (keys(), info(key); a TorchBase also `shared_keys()`).
        path: the base's path (its folder, or the folder holding it, has the config.json).
        wanted: the keys adapters target; used only when there is no config.json to decide.
    Returns:
        A list of Tie, empty when nothing is tied.
    """
    keys = reader.keys()
    ties = []
    shared = getattr(reader, "shared_keys", None)
    for group in (shared() if shared is not None else []):
        first = _embedding(group, reader.info) or group[0]
        ties.extend(Tie(first, k, True, "shared storage") for k in group if k != first)
    if ties:
        return ties
    embed = _embedding(keys, reader.info)
    if embed is None:
        return []
    head = _head_key(keys)
    stored = reader.info(head) is not None
    if stored and tuple(reader.info(head)[0]) != tuple(reader.info(embed)[0]):
        return []
    cfg = _config(Path(path))
    said = config_tie(cfg)
    if said is not None:
        return [Tie(embed, head, stored, "config.json")] if said else []
    if cfg is not None:
        return [] if stored else [Tie(embed, head, False, "config.json (default)")]
    if not stored and head in set(wanted):
        return [Tie(embed, head, False, "adapter targets the missing head")]
    return []


class HeadsView(BaseModel):
    """A base reader that also holds the tied heads the file does not store, as the embedding's tensor (what
    transformers loads), so that adapter readers resolve a target on the head and merge plans fit it."""

    def __init__(self, reader, ties: list[Tie]):
        self._r = reader
        self.path, self.files = reader.path, reader.files
        self.ties = list(ties)  # as found on the reader (a head it lacks is "not stored", whatever the view shows)
        self._missing = {t.head: t.embed for t in ties if not t.head_stored}

    def keys(self):
        return [*self._r.keys(), *self._missing]

    def info(self, key):
        return self._r.info(self._missing.get(key, key))

    def read(self, key):
        return self._r.read(self._missing.get(key, key))

    def mapped(self, key, start: int = 0, stop: int | None = None):
        return self._r.mapped(self._missing.get(key, key), start, stop)

    def sha256(self, key):
        return self._r.sha256(self._missing.get(key, key))

    def check_unchanged(self) -> None:
        self._r.check_unchanged()


def with_heads(reader, ties: list[Tie]):
    """`reader`, or a HeadsView of it when a tie's head is not stored (the reader is not closed by the view)."""
    return HeadsView(reader, ties) if any(not t.head_stored for t in ties) else reader


__all__ = ["Tie", "find_ties", "with_heads", "HeadsView", "config_tie", "TOKEN_EMBEDDINGS", "HEAD", "CONFIG_KEY"]
