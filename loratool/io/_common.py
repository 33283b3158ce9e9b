"""Helpers shared by the foreign-dialect readers and writers (PEFT, kohya, loralib).

Every reader sorts each key of its input into one of: understood (becomes part of a target), recognised
and refused (UnsupportedError), or unknown. Unknown keys are an error that lists them unless the caller
passes `allow_unknown=True`; then they are recorded in `Adapter.info["unknown_keys"]`, never dropped
without a trace.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from ..container import escape, read_all, read_header
from ..errors import FileError, MismatchError, SpecError

MAX_LISTED = 5  # keys named in one error message; the rest are counted


def listing(keys, limit: int = MAX_LISTED) -> str:
    """"a", "b", "c" (and 4 more): a short, escaped list of names for a one-line message."""
    keys = sorted(keys)
    shown = ", ".join(f"\"{escape(k)}\"" for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_unknown(path, dialect: str, unknown, allow_unknown: bool, info: dict) -> None:
    """Raise on keys the reader did not understand, or record them in `info` when they are allowed.

    Raises:
        SpecError: there are unknown keys and `allow_unknown` is False.
    """
    unknown = sorted(set(unknown))
    if not unknown:
        return
    if not allow_unknown:
        raise SpecError(f"{path}: {len(unknown)} key(s) that are not {dialect} LoRA factors: {listing(unknown)}; "
                        "pass --allow-unknown (allow_unknown=True) to ignore them")
    info["unknown_keys"] = unknown


def read_safetensors(path, host: bool = False) -> tuple[dict, dict]:
    """All tensors (name -> torch.Tensor, or hostarray.HostTensor with `host`) and the metadata of a
    safetensors file, read with the strict parser.

    Raises:
        SpecError: the container breaks a C rule (named in the message).
        FileError: the file cannot be read.
    """
    hdr = read_header(path)
    if hdr.errors:
        first = hdr.errors[0]
        raise SpecError(f"{path}: {first.message} (rule {first.rule})", hdr.errors)
    return read_all(path, hdr, host=host), dict(hdr.metadata)


def torch_factors(adapter):
    """The adapter with every HostTensor (numpy) factor or delta turned into a torch tensor, for writers
    that compute with torch."""
    from dataclasses import replace

    from ..hostarray import as_torch

    targets = []
    for t in adapter:
        if t.kind == "full":
            targets.append(replace(t, delta=as_torch(t.delta)))
        else:
            targets.append(t.with_blocks(replace(b, A=as_torch(b.A), B=as_torch(b.B)) for b in t.blocks))
    return adapter.replace_targets(targets)


def read_torch(path) -> dict:
    """A flat state dict from a torch file, loaded with weights_only=True and nothing else.

    Raises:
        SpecError: the file is not a weights-only dict of tensors keyed by strings.
        FileError: the file cannot be read.
    """
    from .base import TorchBase

    return dict(TorchBase(path)._sd)


def finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class BaseKeys:
    """Resolve the keys a dialect derives (PEFT module paths, kohya underscore names) to a base's keys.

    Shapes come from the base's headers; no tensor is read unless `read` is called.
    """

    def __init__(self, base):
        from .base import BaseModel, open_base

        self._own = not isinstance(base, BaseModel)
        self.base = open_base(base) if self._own else base
        self.keys = set(self.base.keys())
        self._underscored: dict[str, list[str]] | None = None

    def close(self):
        if self._own:
            self.base.close()

    def shape(self, key: str) -> tuple[int, ...] | None:
        info = self.base.info(key)
        return None if info is None else tuple(info[0])

    def read(self, key: str):
        return self.base.read(key)

    def resolve_dotted(self, key: str, where: str) -> str:
        """The base key for a dotted key: itself, or the one base key that differs from it only by a leading
        prefix on either side (a model saved with or without its `model.` wrapper, for example).

        Raises:
            MismatchError: no base key, or more than one, fits.
        """
        if key in self.keys:
            return key
        hits = sorted(k for k in self.keys if k.endswith("." + key) or key.endswith("." + k))
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise MismatchError(f"{where}: \"{escape(key)}\" is not in the base {self.base.path} (under any prefix); "
                                "check that --base is the model this adapter was trained on")
        raise MismatchError(f"{where}: \"{escape(key)}\" fits several base keys ({listing(hits)}); "
                            "pass a base with only the model this adapter belongs to")

    def resolve_underscored(self, name: str, where: str) -> str:
        """The base key `<module>.weight` whose module path, with "." replaced by "_", is `name` or ends
        with "_" + `name` (kohya names drop the dots and any wrapper prefix).

        Raises:
            MismatchError: no base key, or more than one, fits.
        """
        if self._underscored is None:
            self._underscored = {}
            for k in self.keys:
                if k.endswith(".weight"):
                    self._underscored.setdefault(k[: -len(".weight")].replace(".", "_"), []).append(k)
        exact = self._underscored.get(name, [])
        hits = exact or sorted(k for u, ks in self._underscored.items() if u.endswith("_" + name) for k in ks)
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise MismatchError(f"{where}: no base key of {self.base.path} matches the kohya name \"{escape(name)}\" "
                                "(dots written as underscores); check that --base is the model this adapter was "
                                "trained on")
        raise MismatchError(f"{where}: kohya name \"{escape(name)}\" fits several base keys ({listing(hits)}); "
                            "underscores make them ambiguous, so pass a base holding only the model it belongs to")


@contextlib.contextmanager
def base_keys(base):
    """A BaseKeys for `base` (path or io.base.BaseModel), or None without one; closes what it opened."""
    if base is None:
        yield None
        return
    bk = BaseKeys(base)
    try:
        yield bk
    finally:
        bk.close()


def require_dir_or_file(path) -> Path:
    """`path` as a Path; FileError when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise FileError(f"{p}: no such file or folder")
    return p
